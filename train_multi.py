"""SwitOKD with several teachers and students (paper Sec. 2.7 and 3.8, Table 7).

Every mini-batch, each teacher-student pair runs SwitOKD's switching test on its own
distances (G of Eqn. 1 against delta of Eqn. 13, under ``--switch-rule``). A student
always learns from the labels, every teacher and every other student. A teacher learns
from the labels, every other teacher and each student whose pair is in learning mode;
it is fully suspended (no backward pass, no optimiser step) only when ALL its pairs are
in expert mode. With three networks these rules are the paper's basis topologies 1T2S
and 2T1S (Fig. 3); with one teacher and one student they are train_switokd.py's.
Example::

    python train_multi.py --dataset digits --teachers wrn_16_2 --students resnet20 mobilenet --epochs 15
    python train_multi.py --topology 2T1S        # Table 7, CIFAR-100

See docs/MULTI.md.
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import numpy as np
import torch
import torch.nn.functional as F

from distill import R_FORMS, SWITCH_RULES, kl_loss, switching_decision, switching_statistics

TOPOLOGIES = {
    "1T2S": (["wrn_16_10"], ["wrn_16_2", "mobilenet"]),
    "2T1S": (["wrn_16_10", "wrn_16_2"], ["mobilenet"]),
}
"""Table 7 (CIFAR-100): (teachers, students) of the two basis topologies of Fig. 3, in the
order of the released scripts' networks."""

SWITCHING_FLAGS = ("switch_rule", "r_form", "fixed_delta", "no_switching", "tau", "alpha", "beta",
                   "paused_teacher", "pair_epsilon")


# --------------------------------------------------------------------------- the method

def role_names(teachers, students):
    """(student roles, teacher roles), each mapping a role to its network name.

    ``student1, student2, ...`` and ``teacher1, ...``; with one teacher and one student the
    roles are ``student`` and ``teacher``, as in train_switokd.py.
    """
    if len(teachers) == 1 and len(students) == 1:
        return {"student": students[0]}, {"teacher": teachers[0]}
    return ({f"student{i}": name for i, name in enumerate(students, 1)},
            {f"teacher{i}": name for i, name in enumerate(teachers, 1)})


def epsilon_sources(stats, pair_epsilon):
    """The distances each pair's epsilon of Eqn. (13) comes from: its own, or, for ``other-pair``
    (the released three-network scripts' slip), the second pair's for the first pair."""
    if pair_epsilon == "own":
        return stats
    return torch.cat([stats[1:2], stats[1:]])


def paused_teachers(expert):
    """Sec. 2.7: the teachers to suspend, from ``expert[(teacher, student)]`` of every pair.

    A teacher is fully paused only when every one of its pairs is in expert mode (1T2S:
    both students); a teacher with one student (2T1S) follows its own pair's test.
    """
    teachers = dict.fromkeys(t for t, _ in expert)
    return [t for t in teachers if all(mode for (tt, _), mode in expert.items() if tt == t)]


def distillation_sources(expert, teachers, students):
    """The KL terms of this iteration: each learning network -> the networks it distils from.

    A student learns from every teacher and every other student, in either mode (Eqns. 5, 8
    and two-way KL between students). A teacher that is not paused learns from every other
    teacher (two-way KL) and from each student whose pair is in learning mode (Eqn. 6).
    Paused teachers are absent. Students come first, then teachers, in the given order.
    """
    paused = paused_teachers(expert)
    sources = {s: list(teachers) + [p for p in students if p != s] for s in students}
    for t in teachers:
        if t not in paused:
            sources[t] = [o for o in teachers if o != t] + [s for s in students if not expert[(t, s)]]
    return sources


def network_loss(logits, guide_logits, targets, weight=1.0, tau=1.0):
    """CE(y, p^1) + weight tau^2 sum_g KL(p_g^tau || p^tau): Eqns. (5), (6) and (8) with several guides.

    The KL terms are summed, as the released scripts do. With one guide this is
    train_switokd.py's ``student_loss`` (Eqns. 5, 8; weight alpha) or ``teacher_loss``
    (Eqn. 6; weight beta), to the bit. Targets are detached. Returns (total, CE, summed KL).
    """
    ce = F.cross_entropy(logits, targets)
    kl = sum((kl_loss(g, logits, tau) for g in guide_logits), logits.new_zeros(()))
    return ce + weight * kl, ce, kl


def train_step(nets, optimizers, images, targets, teachers, students, cfg, precision,
               reduce=utils.all_reduce_mean):
    """One iteration: every pair's test, then one backward through every learning network's loss.

    The pairs' statistics are averaged over processes by ``reduce`` and copied to the host
    once (the decisions); the losses stay on the device. Returns (the trace row, values to log).
    """
    pairs = [(t, s) for t in teachers for s in students]
    with precision.autocast():
        z = {role: net(images).float() for role, net in nets.items()}
    stats = reduce(torch.stack([switching_statistics(z[s], z[t], targets, cfg.tau) for t, s in pairs]))
    delta, expert_flags = switching_decision(stats, cfg.switch_rule, cfg.r_form, cfg.fixed_delta,
                                             not cfg.no_switching, epsilon_sources(stats, cfg.pair_epsilon))
    host = torch.cat([stats, delta[:, None], expert_flags[:, None].float()], 1).tolist()
    expert = {pair: bool(row[4]) for pair, row in zip(pairs, host)}
    sources = distillation_sources(expert, teachers, students)
    paused = paused_teachers(expert)

    losses = {role: network_loss(z[role], [z[g] for g in sources.get(role, [])], targets,
                                 cfg.alpha if role in students else cfg.beta, cfg.tau) for role in nets}
    learners = [optimizers[role] for role in sources]
    for optimizer in learners:
        optimizer.zero_grad(set_to_none=True)
    # One backward for every learner; KL targets are detached, so none reaches a paused teacher.
    precision.backward(sum(losses[role][0] for role in sources))
    if cfg.paused_teacher == "zero-step":  # the released 1T2S script steps a paused teacher on a zero loss
        for t in paused:
            for param in nets[t].parameters():
                param.grad = torch.zeros_like(param)
        learners += [optimizers[t] for t in paused]
    precision.step(*learners)

    row = {"G": [r[0] for r in host], "ps_y": [r[1] for r in host], "pt_y": [r[2] for r in host],
           "delta": [r[3] for r in host], "expert": [r[4] for r in host],
           "paused": [float(t in paused) for t in teachers],
           # per network, in the order of ``nets``; left on the device (copied once an epoch)
           "ce": torch.stack([losses[r][1] for r in nets]).detach(),
           "kl": torch.stack([losses[r][2] for r in nets]).detach()}
    logged = {f"{t}-{s}/{key}": row[key][i] for i, (t, s) in enumerate(pairs) for key in ("G", "delta", "expert")}
    logged.update({f"{t}/paused": value for t, value in zip(teachers, row["paused"])})
    for role, (_, ce, kl) in losses.items():
        logged.update({f"{role}/ce": ce, f"{role}/kl": kl})
    return row, logged


# --------------------------------------------------------------------------- results

def multi_summary(args, topology, trace, pairs, teachers, roles):
    """What results.json records beyond the common fields; names the trace's columns."""
    expert = np.concatenate([t["expert"] for t in trace]) if trace else np.zeros((0, len(pairs)))
    paused = np.concatenate([t["paused"] for t in trace]) if trace else np.zeros((0, len(teachers)))
    mean = (lambda column: float(column.mean())) if len(expert) else (lambda column: 0.0)
    return {
        "topology": topology,
        "teachers": list(teachers),
        "students": [r for r in roles if r not in teachers],
        "expert_fraction": {f"{t}-{s}": mean(expert[:, i]) for i, (t, s) in enumerate(pairs)},
        "paused_fraction": {t: mean(paused[:, i]) for i, t in enumerate(teachers)},
        "iterations": int(len(expert)),
        "trace_columns": {"pairs": [f"{t}-{s}" for t, s in pairs], "teachers": list(teachers),
                          "networks": list(roles)},
        "switching": {flag: getattr(args, flag) for flag in SWITCHING_FLAGS},
    }


# --------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--topology", choices=tuple(TOPOLOGIES),
                       help="Table 7 preset: 1T2S = teacher wrn_16_10, students wrn_16_2 and mobilenet; "
                            "2T1S = teachers wrn_16_10 and wrn_16_2, student mobilenet")
    p.network_argument("--teachers", nargs="+", metavar="NET", help="teacher networks (override the preset's)")
    p.network_argument("--students", nargs="+", metavar="NET", help="student networks (override the preset's)")
    g = p.method_group("SwitOKD, several networks")
    g.add_argument("--switch-rule", default="text", choices=SWITCH_RULES,
                   help="per pair; text: G > delta and ||p_t-y|| < ||p_s-y||; algorithm1: G > delta")
    g.add_argument("--r-form", default="sum", choices=R_FORMS, help="r of Eqn. 13 (sum: the paper's)")
    g.add_argument("--fixed-delta", type=utils.number(float, 0, 2), metavar="DELTA",
                   help="a fixed threshold for every pair instead of Eqn. 13 (default: Eqn. 13)")
    g.add_argument("--no-switching", action="store_true", help="always learning mode")
    g.add_argument("--tau", type=utils.POSITIVE, default=1.0, help="temperature of every KL term")
    g.add_argument("--alpha", type=utils.NON_NEGATIVE, default=1.0, help="weight of each KL term of a student")
    g.add_argument("--beta", type=utils.NON_NEGATIVE, default=1.0, help="weight of each KL term of a teacher")
    g.add_argument("--paused-teacher", choices=("suspend", "zero-step"),
                   help="suspend: a teacher whose pairs are all in expert mode takes no step (Sec. 2.7); "
                        "zero-step: its optimiser steps on a zero gradient, so momentum and weight decay move it "
                        "(the released 1T2S script) (default: zero-step under --recipe official with one "
                        "teacher and two students, else suspend)")
    g.add_argument("--pair-epsilon", choices=("own", "other-pair"),
                   help="own: each pair's epsilon of Eqn. 13 from its own distances (the paper); other-pair: the "
                        "first pair's from the second pair's, a slip of both released three-network scripts "
                        "(default: other-pair under --recipe official with two pairs, else own)")
    utils.add_common_flags(p)
    args = utils.parse_args(p, argv)
    teachers, students = TOPOLOGIES.get(args.topology, (None, None))
    args.teachers, args.students = args.teachers or teachers, args.students or students
    if not args.teachers or not args.students:
        p.error("no networks: give --topology (1T2S or 2T1S) or both --teachers and --students")
    released, pairs = args.recipe == "official", len(args.teachers) * len(args.students)
    defaults = {"paused_teacher": "zero-step" if released and len(args.teachers) == 1 and len(args.students) == 2
                else "suspend", "pair_epsilon": "other-pair" if released and pairs == 2 else "own"}
    for key, value in defaults.items():  # the recipe's default is a default: not named in the run name
        if getattr(args, key) is None:
            setattr(args, key, value)
            args._defaults[key] = value
    if args.pair_epsilon == "other-pair" and pairs != 2:
        p.error(f"--pair-epsilon other-pair needs exactly two teacher-student pairs, not {pairs}")
    if args.no_switching and args.fixed_delta is not None:
        p.error("--no-switching (always learning mode) and --fixed-delta (a fixed threshold) exclude each other")
    return args


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    students, teachers = role_names(args.teachers, args.students)
    topology = f"{len(teachers)}T{len(students)}S"
    run = utils.Run(args, "switokd_multi", {**students, **teachers},  # 1T1S: the two-network scripts' recipe
                    script="three-networks" if len(students) + len(teachers) > 2 else None)
    pairs = [(t, s) for t in teachers for s in students]
    trace = run.state.setdefault("trace", [])  # one dict of per-iteration arrays per epoch
    run.add_derived_file("switching.npz", lambda path: utils.save_trace(path, trace))

    for epoch in run.epochs():
        rows = []
        for images, targets in run.train_batches():
            row, logged = train_step(run.nets, run.optimizers, images, targets, list(teachers), list(students),
                                     args, run.precision)
            rows.append(row)
            run.log(logged)
        epoch_trace = {key: torch.stack([r[key] for r in rows]).float().cpu().numpy() if torch.is_tensor(rows[0][key])
                       else np.asarray([r[key] for r in rows], dtype=np.float32) for key in rows[0]}
        epoch_trace["seconds"] = run.iteration_seconds().astype(np.float32)
        trace.append(epoch_trace)
        run.step_schedulers()
        metrics = run.evaluate()
        run.end_epoch(metrics, epoch_extras(epoch_trace, pairs, list(teachers)))

    return run.finish(multi_summary(args, topology, trace, pairs, list(teachers), list(run.networks)))


def epoch_extras(epoch_trace, pairs, teachers):
    """Per-epoch switching statistics: each pair's expert fraction, each teacher's paused fraction."""
    extra = {f"switch/{t}-{s}/expert_fraction": float(epoch_trace["expert"][:, i].mean())
             for i, (t, s) in enumerate(pairs)}
    extra.update({f"switch/{t}/paused_fraction": float(epoch_trace["paused"][:, i].mean())
                  for i, t in enumerate(teachers)})
    paused_any = epoch_trace["paused"].any(axis=1)
    extra["time/some_teacher_paused_s"] = float(epoch_trace["seconds"][paused_any].sum())
    extra["time/no_teacher_paused_s"] = float(epoch_trace["seconds"][~paused_any].sum())
    return extra


if __name__ == "__main__":
    utils.main_guard(main)

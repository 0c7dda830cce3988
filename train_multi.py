"""SwitOKD with several teachers and students (paper Sec. 2.7 and 3.8, Table 7).

Every mini-batch, each teacher-student pair runs the switching test of SwitOKD on its
own distances (G of Eqn. 1 against delta of Eqn. 13). A student always learns from the
labels, every teacher and every other student. A teacher learns from the labels, every
other teacher and each student whose pair is in learning mode; it is fully suspended
(no backward pass, no optimiser step) only when ALL its pairs are in expert mode. With
three networks these rules are the paper's basis topologies 1T2S and 2T1S (Fig. 3);
with one teacher and one student they are train_switokd.py exactly. Example::

    python train_multi.py --dataset digits --teachers wrn_16_2 --students resnet20 mobilenet --epochs 15
    python train_multi.py --topology 2T1S        # Table 7, CIFAR-100

See docs/MULTI.md.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

import utils
from train_switokd import add_switching_flags, distillation_loss, save_trace, switch_decision

TOPOLOGIES = {
    "1T2S": (["wrn_16_10"], ["wrn_16_2", "mobilenet"]),
    "2T1S": (["wrn_16_10", "wrn_16_2"], ["mobilenet"]),
}
"""Table 7 (CIFAR-100): (teachers, students) of the two basis topologies of Fig. 3."""

SWITCHING_FLAGS = ("switch_rule", "r_form", "fixed_delta", "no_switching", "tau", "alpha", "beta",
                   "paused_teacher")


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

    The KL terms are summed, not averaged. With one guide this is train_switokd.py's
    ``student_loss`` (Eqns. 5, 8; weight alpha) or ``teacher_loss`` (Eqn. 6; weight beta),
    to the bit. Targets are detached. Returns (total, CE term, summed KL before ``weight``).
    """
    ce = F.cross_entropy(logits, targets)
    kl = sum((distillation_loss(g, logits, tau) for g in guide_logits), logits.new_zeros(()))
    return ce + weight * kl, ce, kl


def pair_name(teacher, student):
    return f"{teacher}-{student}"


# --------------------------------------------------------------------------- flags and run

def parse_args(argv=None):
    p = utils.common_parser(__doc__.splitlines()[0])
    p.add_argument("--topology", choices=tuple(TOPOLOGIES),
                   help="Table 7 preset: 1T2S = teacher wrn_16_10, students wrn_16_2 and mobilenet; "
                        "2T1S = teachers wrn_16_10 and wrn_16_2, student mobilenet")
    p.add_argument("--teachers", nargs="+", metavar="NET", help="teacher networks (overrides the preset's)")
    p.add_argument("--students", nargs="+", metavar="NET", help="student networks (overrides the preset's)")
    g = add_switching_flags(p)
    g.add_argument("--paused-teacher", default="suspend", choices=("suspend", "zero-step"),
                   help="suspend: a teacher whose pairs are all in expert mode takes no step (Sec. 2.7); "
                        "zero-step: its optimiser still steps on a zero gradient, so momentum and "
                        "weight decay move it (released 3-network scripts)")
    args = p.parse_args(argv)
    args.switch_rule = args.switch_rule or args.recipe
    teachers, students = TOPOLOGIES.get(args.topology, (None, None))
    args.teachers, args.students = args.teachers or teachers, args.students or students
    if not args.teachers or not args.students:
        raise utils.UsageError("no networks: give --topology (1T2S or 2T1S) "
                               "or both --teachers and --students")
    return args


def step_paused_on_zero_gradient(module):
    """``--paused-teacher zero-step``: give every parameter a zero gradient for the optimiser step."""
    for param in module.parameters():
        param.grad = torch.zeros_like(param)


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    students, teachers = role_names(args.teachers, args.students)
    topology = f"{len(teachers)}T{len(students)}S"
    run = utils.Run(args, "switokd_multi", {**students, **teachers}, recipe_variant=topology)
    pairs = [(t, s) for t in teachers for s in students]
    roles = list(run.nets)  # students, then teachers
    trace = run.state.setdefault("trace", [])  # one dict of per-iteration arrays per epoch

    for epoch in run.epochs():
        rows = []
        for images, targets in run.train_batches():
            start = time.perf_counter()
            with run.autocast():
                z = {role: net(images).float() for role, net in run.nets.items()}
            decisions = {pair: switch_decision(run, args, z[pair[1]], z[pair[0]], targets) for pair in pairs}
            expert = {pair: decision[-1] for pair, decision in decisions.items()}
            sources = distillation_sources(expert, teachers, students)
            paused = paused_teachers(expert)

            losses = {}
            for role in roles:
                with torch.set_grad_enabled(role in sources):
                    weight = args.alpha if role in students else args.beta
                    losses[role] = network_loss(z[role], [z[g] for g in sources.get(role, [])],
                                                targets, weight, args.tau)
            learners = [run.optimizers[role] for role in sources]
            for optimizer in learners:
                optimizer.zero_grad(set_to_none=True)
            # One backward for every learner; KL targets are detached, so none reaches a paused teacher.
            totals = [losses[role][0] for role in sources]
            run.backward(sum(totals[1:], totals[0]))
            if args.paused_teacher == "zero-step":
                for t in paused:
                    step_paused_on_zero_gradient(run.modules[t])
                learners += [run.optimizers[t] for t in paused]
            run.step(*learners)
            run.synchronize()
            seconds = time.perf_counter() - start

            gap, delta, d_s, d_t, modes = zip(*(decisions[pair] for pair in pairs))
            row = {"G": gap, "delta": delta, "ps_y": d_s, "pt_y": d_t, "expert": modes,
                   "paused": [float(t in paused) for t in teachers],
                   "ce": [losses[r][1].item() for r in roles], "kl": [losses[r][2].item() for r in roles],
                   "seconds": seconds}
            rows.append(row)
            run.log_iteration(iteration_scalars(row, pairs, teachers, roles))

        epoch_trace = {key: np.asarray([r[key] for r in rows], dtype=np.float32) for key in rows[0]}
        trace.append(epoch_trace)
        run.end_epoch(epoch_extras(epoch_trace, pairs, teachers))
        if run.main:
            save_trace(run.dir / "switching.npz", trace)

    return run.finish(multi_summary(args, topology, trace, pairs, teachers, roles))


def iteration_scalars(row, pairs, teachers, roles):
    """One iteration's values by name, for TensorBoard (``iter/<name>``) and the epoch means."""
    scalars = {"seconds": row["seconds"]}
    for i, (t, s) in enumerate(pairs):
        for key in ("G", "delta", "ps_y", "pt_y", "expert"):
            scalars[f"{pair_name(t, s)}/{key}"] = row[key][i]
    scalars.update({f"{t}/paused": row["paused"][i] for i, t in enumerate(teachers)})
    for i, role in enumerate(roles):
        scalars[f"{role}/ce"], scalars[f"{role}/kl"] = row["ce"][i], row["kl"][i]
    return scalars


def epoch_extras(epoch_trace, pairs, teachers):
    """Per-epoch switching statistics: each pair's expert fraction, each teacher's paused fraction."""
    extra = {f"switch/{pair_name(t, s)}/expert_fraction": float(epoch_trace["expert"][:, i].mean())
             for i, (t, s) in enumerate(pairs)}
    extra.update({f"switch/{t}/paused_fraction": float(epoch_trace["paused"][:, i].mean())
                  for i, t in enumerate(teachers)})
    paused_any = epoch_trace["paused"].any(axis=1)
    extra["time/some_teacher_paused_s"] = float(epoch_trace["seconds"][paused_any].sum())
    extra["time/no_teacher_paused_s"] = float(epoch_trace["seconds"][~paused_any].sum())
    return extra


def multi_summary(args, topology, trace, pairs, teachers, roles):
    """What results.json records beyond the common fields; names the trace's columns."""
    expert = np.concatenate([t["expert"] for t in trace]) if trace else np.zeros((0, len(pairs)))
    paused = np.concatenate([t["paused"] for t in trace]) if trace else np.zeros((0, len(teachers)))
    mean = (lambda column: float(column.mean())) if len(expert) else (lambda column: 0.0)
    return {
        "topology": topology,
        "teachers": list(teachers),
        "students": [r for r in roles if r not in teachers],
        "expert_fraction": {pair_name(t, s): mean(expert[:, i]) for i, (t, s) in enumerate(pairs)},
        "paused_fraction": {t: mean(paused[:, i]) for i, t in enumerate(teachers)},
        "iterations": int(len(expert)),
        "trace_columns": {"pairs": [pair_name(t, s) for t, s in pairs], "teachers": list(teachers),
                          "networks": list(roles)},
        "switching": {flag: getattr(args, flag) for flag in SWITCHING_FLAGS},
    }


if __name__ == "__main__":
    utils.main_guard(main)

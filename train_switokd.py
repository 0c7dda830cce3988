"""SwitOKD: Switchable Online Knowledge Distillation (Qian et al., ECCV 2022).

A teacher and a student train from scratch together. Every mini-batch, the
distillation gap G (Eqn. 1) is compared with the adaptive switching threshold delta
(Eqn. 13): G <= delta is *learning mode* (both networks learn from each other,
Eqns. 5-6), G > delta is *expert mode* (the teacher is paused and only the student
learns from it, Eqn. 8). Algorithm 1 of the paper. Example::

    python train_switokd.py --dataset digits --student resnet20 --teacher wrn_16_2 --epochs 15

Ablations (Sec. 3.2-3.3): ``--no-switching`` (Table 2 case A), ``--fixed-delta``
(case B), ``--teacher-loss independent`` (case C), ``--r-form ratio`` (Fig. 4e),
``--tau`` (Table 3).
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import utils


# --------------------------------------------------------------------------- the method

def label_distance(logits, targets, tau=1.0):
    """||p^tau - y||_1, summed over classes and averaged over the batch (Eqns. 10-13)."""
    p = F.softmax(logits / tau, dim=1)
    y = F.one_hot(targets, p.size(1)).to(p.dtype)
    return (p - y).abs().sum(dim=1).mean()


def distillation_gap(student_logits, teacher_logits, tau=1.0):
    """The distillation gap G = ||p_s^tau - p_t^tau||_1 of Eqn. (1).

    Summed over the K classes (not divided by K), then averaged over the batch, so that
    G lies in [0, 2] as the paper states (see docs/FIDELITY.md).
    """
    p_s = F.softmax(student_logits / tau, dim=1)
    p_t = F.softmax(teacher_logits / tau, dim=1)
    return (p_s - p_t).abs().sum(dim=1).mean()


def adaptive_threshold(student_distance, teacher_distance, r_form="sum"):
    """delta of Eqn. (13) from d_s = ||p_s - y||_1 and d_t = ||p_t - y||_1.

    delta = d_s - exp(-r) d_t with r = d_t / (d_s + d_t) (``r_form="sum"``, the paper's
    choice) or r = d_t / d_s (``r_form="ratio"``, the rejected form of Fig. 4e).
    """
    if r_form == "sum":
        r = teacher_distance / (student_distance + teacher_distance)
    elif r_form == "ratio":
        r = teacher_distance / student_distance
    else:
        raise ValueError(f"unknown r_form {r_form!r}; choose sum or ratio")
    exp = torch.exp if torch.is_tensor(r) else math.exp
    return student_distance - exp(-r) * teacher_distance


def switching_threshold(student_logits, teacher_logits, targets, tau=1.0, r_form="sum"):
    """The adaptive switching threshold delta of Eqn. (13), from the logits of one batch."""
    return adaptive_threshold(label_distance(student_logits, targets, tau),
                              label_distance(teacher_logits, targets, tau), r_form)


def expert_mode(gap, threshold, student_distance=None, teacher_distance=None, rule="paper"):
    """Algorithm 1, line 5 inverted: expert mode when G > delta, else learning mode.

    ``rule="official"`` also requires the teacher to be closer to the labels than the
    student (d_t < d_s), as every released script does.
    """
    if rule == "paper":
        return bool(gap > threshold)
    if rule == "official":
        return bool(gap > threshold and teacher_distance < student_distance)
    raise ValueError(f"unknown switch rule {rule!r}; choose paper or official")


def distillation_loss(target_logits, logits, tau=1.0):
    """tau^2 KL(p_target^tau || p^tau): the KL term of Eqns. (5), (6) and (8).

    KL summed over classes and averaged over the batch; the target is detached, so the
    gradient flows into ``logits`` only.
    """
    return tau ** 2 * F.kl_div(F.log_softmax(logits / tau, dim=1),
                               F.log_softmax(target_logits.detach() / tau, dim=1),
                               reduction="batchmean", log_target=True)


def student_loss(student_logits, teacher_logits, targets, alpha=1.0, tau=1.0):
    """L_s = CE(y, p_s^1) + alpha tau^2 KL(p_t^tau, p_s^tau): Eqn. (5) (learning) and Eqn. (8) (expert).

    Returns (total, CE term, KL term before alpha).
    """
    ce = F.cross_entropy(student_logits, targets)
    kl = distillation_loss(teacher_logits, student_logits, tau)
    return ce + alpha * kl, ce, kl


def teacher_loss(teacher_logits, student_logits, targets, beta=1.0, tau=1.0, reciprocal=True):
    """L_t^l of the learning mode: Eqn. (6) when ``reciprocal``, else the independent Eqn. (5).

    Eqn. (6): CE(y, p_t^1) + beta tau^2 KL(p_s^tau, p_t^tau); Eqn. (5): CE(y, p_t^1) alone.
    Returns (total, CE term, KL term before beta).
    """
    ce = F.cross_entropy(teacher_logits, targets)
    kl = distillation_loss(student_logits, teacher_logits, tau)
    return (ce + beta * kl if reciprocal else ce), ce, kl


# --------------------------------------------------------------------------- flags

def add_switching_flags(p):
    """The switching flags, shared with train_multi.py."""
    g = p.add_argument_group("SwitOKD")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the student's KL term (Eqns. 5, 8)")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the teacher's KL term (Eqn. 6)")
    g.add_argument("--tau", type=utils.positive(float), default=1.0, help="temperature (Table 3)")
    g.add_argument("--switch-rule", choices=("paper", "official"),
                   help="paper: expert when G > delta (Algorithm 1); official: also needs "
                        "||p_t-y|| < ||p_s-y|| (released code). Default: the --recipe's")
    g.add_argument("--r-form", default="sum", choices=("sum", "ratio"),
                   help="r of Eqn. 13: sum = d_t/(d_s+d_t) (paper), ratio = d_t/d_s (Fig. 4e)")
    g.add_argument("--fixed-delta", type=float, metavar="DELTA",
                   help="Table 2 case B: a fixed switching threshold (0.2, 0.6, 0.8) instead of Eqn. 13")
    g.add_argument("--no-switching", action="store_true",
                   help="Table 2 case A: always learning mode (no switching)")
    return g


def parse_args(argv=None):
    p = utils.common_parser(__doc__.splitlines()[0])
    p.add_argument("--student", default="mobilenetv2_0.5", help="student network (python -m models)")
    p.add_argument("--teacher", default="wrn_16_2", help="teacher network")
    g = add_switching_flags(p)
    g.add_argument("--teacher-loss", default="reciprocal", choices=("reciprocal", "independent"),
                   help="learning-mode teacher loss: reciprocal = Eqn. 6, independent = Eqn. 5 "
                        "(Table 2 case C)")
    args = p.parse_args(argv)
    args.switch_rule = args.switch_rule or args.recipe
    return args


def switch_decision(run, args, z_s, z_t, targets):
    """G, delta, d_s, d_t and the mode of this batch, identical on every process.

    Under DDP the three batch means are averaged over processes first, so the decision
    is taken on the global batch and every rank runs (or skips) the teacher's backward.
    """
    with torch.no_grad():
        stats = torch.stack([distillation_gap(z_s, z_t, args.tau),
                             label_distance(z_s, targets, args.tau),
                             label_distance(z_t, targets, args.tau)])
    gap, d_s, d_t = run.all_reduce_mean(stats).tolist()
    if args.fixed_delta is not None:
        delta = args.fixed_delta
    else:
        delta = adaptive_threshold(d_s, d_t, args.r_form)
    expert = not args.no_switching and expert_mode(gap, delta, d_s, d_t, args.switch_rule)
    return gap, delta, d_s, d_t, expert


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    run = utils.Run(args, "switokd", {"student": args.student, "teacher": args.teacher})
    student, teacher = run.nets["student"], run.nets["teacher"]
    opt_s, opt_t = run.optimizers["student"], run.optimizers["teacher"]
    trace = run.state.setdefault("trace", [])  # one dict of per-iteration arrays per epoch

    for epoch in run.epochs():
        rows = []
        for images, targets in run.train_batches():
            start = time.perf_counter()
            with run.autocast():
                z_s, z_t = student(images).float(), teacher(images).float()
            gap, delta, d_s, d_t, expert = switch_decision(run, args, z_s, z_t, targets)

            loss_s, ce_s, kl_s = student_loss(z_s, z_t, targets, args.alpha, args.tau)
            loss_t, ce_t, kl_t = teacher_loss(z_t, z_s, targets, args.beta, args.tau,
                                              reciprocal=args.teacher_loss == "reciprocal")
            opt_s.zero_grad(set_to_none=True)
            if expert:  # Eqn. (8): the teacher is paused, no backward pass through it
                run.backward(loss_s)
                run.step(opt_s)
            else:  # Eqns. (5)-(6): both networks learn
                opt_t.zero_grad(set_to_none=True)
                run.backward(loss_s + loss_t)
                run.step(opt_s, opt_t)
            run.synchronize()
            seconds = time.perf_counter() - start

            values = {"G": gap, "delta": delta, "ps_y": d_s, "pt_y": d_t, "expert": float(expert),
                      "student_ce": ce_s.item(), "student_kl": kl_s.item(),
                      "teacher_ce": ce_t.item(), "teacher_kl": kl_t.item(), "seconds": seconds}
            rows.append(list(values.values()))
            run.log_iteration(values)

        epoch_trace = dict(zip(values, np.asarray(rows, dtype=np.float32).T))
        trace.append(epoch_trace)
        expert_flags = epoch_trace["expert"].astype(bool)
        seconds = epoch_trace["seconds"]
        run.end_epoch({
            "switch/expert_fraction": float(expert_flags.mean()),
            "time/expert_s": float(seconds[expert_flags].sum()),
            "time/learning_s": float(seconds[~expert_flags].sum()),
        })
        if run.main:
            save_trace(run.dir / "switching.npz", trace)

    return run.finish(switching_summary(args, trace))


def save_trace(path, trace):
    """Write every iteration's G, delta, distances, mode, losses and time (for Figs. 4 and 7)."""
    arrays = {key: np.concatenate([t[key] for t in trace]) for key in trace[0]}
    arrays["expert"] = arrays["expert"].astype(np.uint8)
    arrays["epoch"] = np.concatenate([np.full(len(t["G"]), i + 1, np.int32) for i, t in enumerate(trace)])

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez_compressed(f, **arrays)
    utils.atomic_write(path, write)


def switching_summary(args, trace):
    """What results.json records about the switching, beyond the common fields."""
    expert = np.concatenate([t["expert"] for t in trace]).astype(bool) if trace else np.zeros(0, bool)
    seconds = np.concatenate([t["seconds"] for t in trace]) if trace else np.zeros(0)
    per_iteration = {mode: float(seconds[mask].mean()) if mask.any() else None
                     for mode, mask in (("expert", expert), ("learning", ~expert))}
    return {
        "expert_fraction": float(expert.mean()) if len(expert) else 0.0,
        "iterations": int(len(expert)),
        "seconds_per_iteration": per_iteration,
        "switching": {"rule": args.switch_rule, "r_form": args.r_form, "fixed_delta": args.fixed_delta,
                      "no_switching": args.no_switching, "tau": args.tau, "alpha": args.alpha,
                      "beta": args.beta, "teacher_loss": getattr(args, "teacher_loss", "reciprocal")},
    }


if __name__ == "__main__":
    utils.main_guard(main)

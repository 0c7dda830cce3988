"""SwitOKD: Switchable Online Knowledge Distillation (Qian et al., ECCV 2022).

A teacher and a student train from scratch together. Every mini-batch, the
distillation gap G (Eqn. 1) is compared with the adaptive switching threshold delta
(Eqn. 13): G <= delta is *learning mode* (both networks learn from each other,
Eqns. 5-6); G > delta, while the teacher is still closer to the labels than the student,
is *expert mode* (the teacher is paused and only the student learns from it, Eqn. 8).
Algorithm 1 of the paper, with the switching rule of its text (``--switch-rule``).
Example::

    python train_switokd.py --dataset digits --student resnet20 --teacher wrn_16_2 --epochs 15

Ablations (Sec. 3.2-3.3): ``--no-switching`` (Table 2 case A), ``--fixed-delta``
(case B), ``--teacher-loss independent`` (case C), ``--r-form ratio`` (Fig. 4e),
``--tau`` (Table 3), ``--switch-rule algorithm1`` (Algorithm 1 taken literally).
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import numpy as np
import torch
import torch.nn.functional as F

from distill import R_FORMS, SWITCH_RULES, kl_loss, switching_decision, switching_statistics

TRACE = ("G", "delta", "ps_y", "pt_y", "expert", "student_ce", "student_kl", "teacher_ce", "teacher_kl")
"""What every iteration records (switching.npz, TensorBoard ``iter/``), besides its ``seconds``."""


# --------------------------------------------------------------------------- the method

def student_loss(student_logits, teacher_logits, targets, alpha=1.0, tau=1.0):
    """L_s = CE(y, p_s^1) + alpha tau^2 KL(p_t^tau, p_s^tau): Eqn. (5) (learning) and Eqn. (8) (expert).

    The teacher's prediction is a detached target. Returns (total, CE term, KL term before alpha).
    """
    ce = F.cross_entropy(student_logits, targets)
    kl = kl_loss(teacher_logits, student_logits, tau)
    return ce + alpha * kl, ce, kl


def teacher_loss(teacher_logits, student_logits, targets, beta=1.0, tau=1.0, reciprocal=True):
    """L_t^l of the learning mode: Eqn. (6) when ``reciprocal``, else the independent Eqn. (5).

    Eqn. (6): CE(y, p_t^1) + beta tau^2 KL(p_s^tau, p_t^tau); Eqn. (5): CE(y, p_t^1) alone.
    Returns (total, CE term, KL term before beta).
    """
    ce = F.cross_entropy(teacher_logits, targets)
    kl = kl_loss(student_logits, teacher_logits, tau)
    return (ce + beta * kl if reciprocal else ce), ce, kl


def train_step(student, teacher, opt_s, opt_t, images, targets, cfg, precision, reduce=utils.all_reduce_mean):
    """One iteration of Algorithm 1; returns the values of :data:`TRACE` as floats.

    Both forward passes, the switching statistics (averaged over processes by ``reduce``, so
    that every rank takes the same decision), both losses, then ONE copy to the host of the
    decision and the logged values together, then the mode's backward pass and steps.
    """
    with precision.autocast():
        z_s, z_t = student(images).float(), teacher(images).float()
    stats = reduce(switching_statistics(z_s, z_t, targets, cfg.tau))
    delta, expert = switching_decision(stats, cfg.switch_rule, cfg.r_form, cfg.fixed_delta, not cfg.no_switching)
    loss_s, ce_s, kl_s = student_loss(z_s, z_t, targets, cfg.alpha, cfg.tau)
    loss_t, ce_t, kl_t = teacher_loss(z_t, z_s, targets, cfg.beta, cfg.tau, cfg.teacher_loss == "reciprocal")
    values = dict(zip(TRACE, torch.stack([stats[0], delta, stats[1], stats[2], expert.float(),
                                          ce_s, kl_s, ce_t, kl_t]).tolist()))
    opt_s.zero_grad(set_to_none=True)
    if values["expert"]:  # Eqn. (8): the teacher is paused, no backward pass through it
        precision.backward(loss_s)
        precision.step(opt_s)
    else:  # Eqns. (5)-(6): both networks learn
        opt_t.zero_grad(set_to_none=True)
        precision.backward(loss_s + loss_t)
        precision.step(opt_s, opt_t)
    return values


# --------------------------------------------------------------------------- results

def switching_summary(args, trace):
    """What results.json records about the switching, beyond the common fields."""
    expert = np.concatenate([t["expert"] for t in trace]).astype(bool) if trace else np.zeros(0, bool)
    seconds = np.concatenate([t["seconds"] for t in trace]) if trace else np.zeros(0)
    return {
        "expert_fraction": float(expert.mean()) if len(expert) else 0.0,
        "iterations": int(len(expert)),
        "seconds_per_iteration": {mode: float(seconds[mask].mean()) if mask.any() else None
                                  for mode, mask in (("expert", expert), ("learning", ~expert))},
        "switching": {"rule": args.switch_rule, "r_form": args.r_form, "fixed_delta": args.fixed_delta,
                      "no_switching": args.no_switching, "tau": args.tau, "alpha": args.alpha, "beta": args.beta,
                      "teacher_loss": args.teacher_loss},
    }


# --------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--student", default="mobilenetv2_0.5", help="the student network")
    p.network_argument("--teacher", default="wrn_16_2", help="the teacher network")
    g = p.method_group("SwitOKD")
    g.add_argument("--switch-rule", default="text", choices=SWITCH_RULES,
                   help="text: expert mode when G > delta and ||p_t-y|| < ||p_s-y|| (Secs. 2.4-2.5, every "
                        "released script); algorithm1: when G > delta (Algorithm 1 literally; the teacher can "
                        "be trapped in expert mode, docs/FIDELITY.md)")
    g.add_argument("--r-form", default="sum", choices=R_FORMS,
                   help="r of Eqn. 13: sum = d_t/(d_s+d_t) (the paper's), ratio = d_t/d_s (Fig. 4e)")
    g.add_argument("--fixed-delta", type=utils.number(float, 0, 2), metavar="DELTA",
                   help="Table 2 case B: this fixed threshold (0.2, 0.6, 0.8) instead of Eqn. 13 (default: Eqn. 13)")
    g.add_argument("--no-switching", action="store_true", help="Table 2 case A: always learning mode")
    g.add_argument("--teacher-loss", default="reciprocal", choices=("reciprocal", "independent"),
                   help="learning-mode teacher loss: reciprocal = Eqn. 6, independent = Eqn. 5 (Table 2 case C)")
    g.add_argument("--tau", type=utils.POSITIVE, default=1.0, help="temperature (Table 3)")
    g.add_argument("--alpha", type=utils.NON_NEGATIVE, default=1.0, help="weight of the student's KL term (Eqns. 5, 8)")
    g.add_argument("--beta", type=utils.NON_NEGATIVE, default=1.0, help="weight of the teacher's KL term (Eqn. 6)")
    utils.add_common_flags(p)
    args = utils.parse_args(p, argv)
    if args.no_switching and args.fixed_delta is not None:
        p.error("--no-switching (Table 2 case A) and --fixed-delta (case B) exclude each other")
    return args


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    run = utils.Run(args, "switokd", {"student": args.student, "teacher": args.teacher})
    student, teacher = run.nets["student"], run.nets["teacher"]
    opt_s, opt_t = run.optimizers["student"], run.optimizers["teacher"]
    trace = run.state.setdefault("trace", [])  # one dict of per-iteration arrays per epoch
    run.add_derived_file("switching.npz", lambda path: utils.save_trace(path, trace))

    for epoch in run.epochs():
        rows = []
        for images, targets in run.train_batches():
            values = train_step(student, teacher, opt_s, opt_t, images, targets, args, run.precision)
            rows.append(list(values.values()))
            run.log(values)
        epoch_trace = {**dict(zip(TRACE, np.asarray(rows, dtype=np.float32).T)),
                       "seconds": run.iteration_seconds().astype(np.float32)}
        trace.append(epoch_trace)
        run.step_schedulers()
        metrics = run.evaluate()
        expert = epoch_trace["expert"].astype(bool)
        run.end_epoch(metrics, {"switch/expert_fraction": float(expert.mean()),
                                "time/expert_s": float(epoch_trace["seconds"][expert].sum()),
                                "time/learning_s": float(epoch_trace["seconds"][~expert].sum())})

    return run.finish(switching_summary(args, trace))


if __name__ == "__main__":
    utils.main_guard(main)

"""Distillation primitives that more than one training script uses.

Each training script writes its own losses from these; none of them trains anything.

* :func:`kl_loss`: the tau^2-scaled KL term of Hinton et al. (2015) as every method here
  uses it (SwitOKD Eqns. 2, 5, 6, 8; DML; KDCL; KD).
* SwitOKD's switching quantities (Qian et al., ECCV 2022), shared by ``train_switokd.py``
  and ``train_multi.py``: :func:`label_distance`, :func:`distillation_gap` (Eqn. 1),
  :func:`adaptive_threshold` (Eqn. 13), :func:`switching_statistics`, :func:`expert_mode`
  (Algorithm 1, line 5, under the two rules of :data:`SWITCH_RULES`) and
  :func:`switching_decision`, which puts them together.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SWITCH_RULES = ("text", "algorithm1")
"""``text``: expert mode when G > delta AND d_t < d_s (Secs. 2.4-2.5 and every released script);
``algorithm1``: expert mode when G > delta (Algorithm 1 taken literally). See docs/FIDELITY.md."""

R_FORMS = ("sum", "ratio")


def kl_loss(target_logits, logits, tau=1.0, detach=True):
    """tau^2 KL(p_target^tau || p^tau): the distillation term (SwitOKD Eqn. 2 with Hinton's tau^2).

    KL summed over the classes and averaged over the batch ("batchmean"); the paper's 1/K
    would break the gradients of Eqns. (4), (7) and (9) (docs/FIDELITY.md). The target is
    detached unless ``detach=False``, so by default the gradient flows into ``logits`` only.
    """
    if detach:
        target_logits = target_logits.detach()
    return tau ** 2 * F.kl_div(F.log_softmax(logits / tau, dim=1), F.log_softmax(target_logits / tau, dim=1),
                               reduction="batchmean", log_target=True)


def label_distance(logits, targets, tau=1.0):
    """||p^tau - y||_1, summed over the classes and averaged over the batch (SwitOKD Eqns. 10-13)."""
    p = F.softmax(logits / tau, dim=1)
    y = F.one_hot(targets, p.size(1)).to(p.dtype)
    return (p - y).abs().sum(dim=1).mean()


def distillation_gap(student_logits, teacher_logits, tau=1.0):
    """The distillation gap G = ||p_s^tau - p_t^tau||_1 of SwitOKD Eqn. (1).

    Summed over the K classes (not divided by K), then averaged over the batch, so that
    G lies in [0, 2] as the paper states (docs/FIDELITY.md).
    """
    p_s = F.softmax(student_logits / tau, dim=1)
    p_t = F.softmax(teacher_logits / tau, dim=1)
    return (p_s - p_t).abs().sum(dim=1).mean()


def adaptive_threshold(student_distance, teacher_distance, r_form="sum", epsilon_distances=None):
    """delta = d_s - exp(-r) d_t: SwitOKD Eqn. (13), from d_s = ||p_s - y||_1 and d_t = ||p_t - y||_1.

    r = d_t / (d_s + d_t) (``r_form="sum"``, the paper's) or r = d_t / d_s (``"ratio"``, the
    rejected form of Fig. 4e). ``epsilon_distances=(d_s', d_t')`` takes epsilon = exp(-r) from
    another pair's distances, as one pair of each released three-network script does.
    Works on floats and on tensors.
    """
    d_s, d_t = epsilon_distances if epsilon_distances is not None else (student_distance, teacher_distance)
    if r_form == "sum":
        r = d_t / (d_s + d_t)
    elif r_form == "ratio":
        r = d_t / d_s
    else:
        raise ValueError(f"unknown r_form {r_form!r}; choose from {', '.join(R_FORMS)}")
    exp = torch.exp if torch.is_tensor(r) else math.exp
    return student_distance - exp(-r) * teacher_distance


@torch.no_grad()
def switching_statistics(student_logits, teacher_logits, targets, tau=1.0):
    """The batch's (G, d_s, d_t) as one tensor: Eqn. (1) and the two label distances of Eqn. (13).

    One tensor, so that a caller training on several processes averages all three with
    one all-reduce before deciding.
    """
    return torch.stack([distillation_gap(student_logits, teacher_logits, tau),
                        label_distance(student_logits, targets, tau),
                        label_distance(teacher_logits, targets, tau)])


def expert_mode(gap, threshold, student_distance, teacher_distance, rule="text"):
    """Expert mode (the teacher pauses) or learning mode, from one batch's G, delta, d_s, d_t.

    ``rule="algorithm1"``: G > delta (Algorithm 1, line 5, inverted). ``rule="text"``: also
    d_t < d_s, the teacher closer to the labels than the student (the paper's Secs. 2.4-2.5:
    once the student catches up, SwitOKD switches back to learning mode; every released
    script). A pure function: tensors in, a boolean tensor out (floats in, a bool out).
    """
    if rule == "algorithm1":
        return gap > threshold
    if rule == "text":
        return (gap > threshold) & (teacher_distance < student_distance)
    raise ValueError(f"unknown switch rule {rule!r}; choose from {', '.join(SWITCH_RULES)}")


def switching_decision(stats, rule="text", r_form="sum", fixed_delta=None, switching=True, epsilon_stats=None):
    """(delta, expert) from ``stats`` = (..., 3) rows of (G, d_s, d_t): Eqn. (13) (or a fixed delta), then the rule.

    One row per teacher-student pair (or a single row). ``epsilon_stats`` (same shape) gives the
    distances each row's epsilon = exp(-r) is computed from (the released three-network scripts'
    slip); by default each row's own. ``switching=False`` keeps every pair in learning mode
    (Table 2 case A). A pure function of tensors: averaging over processes is the caller's.
    """
    gap, d_s, d_t = stats.unbind(-1)
    if fixed_delta is not None:
        delta = torch.full_like(gap, fixed_delta)
    else:
        delta = adaptive_threshold(d_s, d_t, r_form, None if epsilon_stats is None else epsilon_stats.unbind(-1)[1:])
    return delta, expert_mode(gap, delta, d_s, d_t, rule) & switching

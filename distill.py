"""Distillation primitives that more than one training script uses.

Each training script writes its own losses from these; none of them trains anything.

* :func:`kl_loss`: the tau^2-scaled KL term of Hinton et al. (2015) as every method here
  uses it (SwitOKD Eqns. 2, 5, 6, 8; DML; KDCL; KD).
* SwitOKD's switching quantities (Qian et al., ECCV 2022), shared by ``train_switokd.py``
  and ``train_multi.py``: :func:`label_distance`, :func:`distillation_gap` (Eqn. 1),
  :func:`adaptive_threshold` (Eqn. 13), :func:`switching_statistics`, :func:`expert_mode`
  (Algorithm 1, line 5, under the two rules of :data:`SWITCH_RULES`) and
  :func:`switching_decision`, which puts them together.
* The OKDDip release's shared pieces (Chen et al., AAAI 2020; cited as "R x" of docs/OKDDIP.md's
  last section, which gives the release's files and lines), used by ``train_okddip.py``, ``train_one.py`` and
  ``train_dml.py``: :func:`okddip_kl` (its ``utils.KL_Loss``), :func:`consistency_weight` (its
  ramp-up) and :func:`release_diversity` / :class:`DiversityMeter` (its ``dist``).
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


def okddip_kl(target_logits, logits, tau=3.0):
    """The OKDDip release's distillation term ``utils.KL_Loss`` (R0), used by every method there.

    ``T^2 (1/B) sum_b sum_c p_bc (log p_bc - log softmax(s_b / T)_c)`` with ``p = softmax(t / T) + 1e-7``:
    forward KL(teacher || student), "batchmean", T^2 inside the term, 1e-7 added to every teacher
    probability (the target then sums to 1 + C 1e-7; not renormalised). NOTHING is detached: the
    gradient also flows into ``target_logits`` (and whatever computed them), as in the release;
    a caller that wants a fixed target passes ``target_logits.detach()``.
    """
    p = F.softmax(target_logits / tau, dim=1) + 1e-7
    return tau ** 2 * F.kl_div(F.log_softmax(logits / tau, dim=1), p, reduction="batchmean")


def consistency_weight(epoch, length=80):
    """The ramp-up w(e) = exp(-5 (1 - clip(e, 0, L) / L)^2) of the OKDDip release (R0).

    ``epoch`` is the 0-based epoch index: the release evaluates w once per epoch, so w(0) = 0.0067,
    w(40) = 0.2865, w(e >= L) = 1 (ONE's code, after Laine & Aila). ``length`` L = 0 gives 1 (no ramp).
    The release's ``--start_consistency`` (default 0, never used) is not reproduced.
    """
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0), length) / length
    return math.exp(-5.0 * phase * phase)


def release_diversity(logits):
    """The release's peer diversity ``dist`` of each image (R3.1), shape (B,).

    ``logits`` (m, B, C), branch k = ``logits[k]``; with ``p_k = softmax(z_k)`` (T = 1):
    ``(1/3) sum_{0 <= j < k <= m-2} ||p_j - p_k||_2``. Reproduced with its quirks: the pairs run over
    branches 0..m-2 only (the last branch, OKDDip's leader, never counts; in ONE/CL-ILR/Ind the last
    branch is simply ignored) and the divisor is 3 whatever m (3 = the number of pairs when m = 4).
    """
    p = F.softmax(logits.float(), dim=-1)
    total = p.new_zeros(p.shape[1])
    for j in range(len(p) - 1):
        for k in range(j + 1, len(p) - 1):
            total = total + (p[j] - p[k]).norm(dim=1)
    return total / 3


class DiversityMeter:
    """The mean of :func:`release_diversity` over a test pass: ``add(logits)`` per batch, then ``value()``.

    ``value(reduce)``: ``reduce`` averages the (sum, count) pair over processes (``utils.all_reduce_mean``),
    so every image weighs the same (the release averages per image too).
    """

    def __init__(self):
        self.sums = None  # (sum of the per-image values, number of images), on the logits' device

    def add(self, logits):
        d = release_diversity(logits).double()
        batch = torch.stack([d.sum(), d.new_tensor(len(d))])
        self.sums = batch if self.sums is None else self.sums + batch

    def value(self, reduce=lambda t: t):
        if self.sums is None:
            return float("nan")
        total, count = reduce(self.sums).tolist()
        return total / count


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

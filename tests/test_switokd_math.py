"""The equations of SwitOKD against hand computations and autograd."""
import math

import pytest
import torch
import torch.nn.functional as F

from distill import (SWITCH_RULES, adaptive_threshold, distillation_gap, expert_mode, kl_loss, label_distance,
                     switching_decision, switching_statistics)
from train_switokd import student_loss, teacher_loss


def switching_threshold(z_s, z_t, y, tau=1.0, r_form="sum"):
    """delta of Eqn. (13) from one batch's logits (the old train_switokd.switching_threshold)."""
    return adaptive_threshold(label_distance(z_s, y, tau), label_distance(z_t, y, tau), r_form)


def logits_for(probabilities):
    """Logits whose softmax is exactly ``probabilities`` (at tau = 1)."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_distillation_gap_by_hand():
    # Eqn. (1), summed over classes: |0.7-0.2| + |0.2-0.5| + |0.1-0.3| = 1.0 and 0 for equal rows.
    z_s = logits_for([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    z_t = logits_for([[0.2, 0.5, 0.3], [0.5, 0.25, 0.25]])
    assert distillation_gap(z_s, z_t).item() == pytest.approx(0.5)


def test_distillation_gap_range_reaches_two():
    z_s = torch.tensor([[40.0, 0.0, 0.0]])
    z_t = torch.tensor([[0.0, 40.0, 0.0]])
    assert distillation_gap(z_s, z_t).item() == pytest.approx(2.0)
    g = distillation_gap(torch.randn(64, 100) * 5, torch.randn(64, 100) * 5)
    assert 0.0 <= g.item() <= 2.0


def test_distillation_gap_uses_temperature():
    z_s, z_t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    p = 1 / (1 + math.exp(-2 / 4))  # softmax of [2, 0] at tau = 4
    assert distillation_gap(z_s, z_t, tau=4).item() == pytest.approx(2 * (2 * p - 1), rel=1e-6)


def test_label_distance_by_hand():
    z = logits_for([[0.7, 0.2, 0.1]])
    # |0.7 - 1| + 0.2 + 0.1 = 0.6
    assert label_distance(z, torch.tensor([0])).item() == pytest.approx(0.6)
    assert label_distance(z, torch.tensor([2])).item() == pytest.approx(0.7 + 0.2 + 0.9)


def test_switching_threshold_eqn13_by_hand():
    z_s = logits_for([[0.4, 0.3, 0.3]])   # d_s = 0.6 + 0.3 + 0.3 = 1.2
    z_t = logits_for([[0.8, 0.1, 0.1]])   # d_t = 0.2 + 0.1 + 0.1 = 0.4
    y = torch.tensor([0])
    expected = 1.2 - math.exp(-0.4 / 1.6) * 0.4
    assert switching_threshold(z_s, z_t, y).item() == pytest.approx(expected)
    ratio = 1.2 - math.exp(-0.4 / 1.2) * 0.4
    assert switching_threshold(z_s, z_t, y, r_form="ratio").item() == pytest.approx(ratio)
    assert adaptive_threshold(1.2, 0.4) == pytest.approx(expected)


def test_threshold_within_bounds_of_eqn11():
    # Eqn. (11): d_s - d_t <= delta < d_s, for any d_t > 0.
    torch.manual_seed(0)
    for _ in range(50):
        z_s, z_t = torch.randn(8, 10) * 3, torch.randn(8, 10) * 3
        y = torch.randint(0, 10, (8,))
        d_s, d_t = label_distance(z_s, y).item(), label_distance(z_t, y).item()
        for r_form in ("sum", "ratio"):
            delta = switching_threshold(z_s, z_t, y, r_form=r_form).item()
            assert d_s - d_t - 1e-6 <= delta < d_s


def test_ratio_form_gives_a_larger_threshold():
    # r = d_t/d_s > d_t/(d_s+d_t), so exp(-r) is smaller and delta is larger (fewer expert steps).
    assert adaptive_threshold(1.0, 0.5, "ratio") > adaptive_threshold(1.0, 0.5, "sum")


def test_unknown_r_form_and_rule_rejected():
    with pytest.raises(ValueError, match="r_form"):
        adaptive_threshold(1.0, 0.5, "product")
    with pytest.raises(ValueError, match="rule"):
        expert_mode(1.0, 0.5, 1.2, 0.4, rule="sometimes")
    with pytest.raises(ValueError, match="rule"):
        switching_decision(torch.tensor([1.0, 1.2, 0.4]), rule="paper")  # the old names are gone
    assert SWITCH_RULES == ("text", "algorithm1")


@pytest.mark.parametrize("gap,delta,d_s,d_t,algorithm1,text", [
    (0.9, 0.5, 1.2, 0.4, True, True),     # G > delta, teacher closer to labels
    (0.3, 0.5, 1.2, 0.4, False, False),   # G <= delta: learning mode under both rules
    (0.5, 0.5, 1.2, 0.4, False, False),   # G == delta is learning mode (Algorithm 1, line 5)
    (0.9, 0.5, 0.4, 1.2, True, False),    # student closer to labels: the text's rule refuses
])
def test_mode_decision(gap, delta, d_s, d_t, algorithm1, text):
    assert expert_mode(gap, delta, d_s, d_t, rule="algorithm1") is algorithm1
    assert expert_mode(gap, delta, d_s, d_t, rule="text") is text
    assert expert_mode(gap, delta, d_s, d_t) is text  # the default rule
    # the same decision on tensors, one row per pair
    rows = torch.tensor([[gap, d_s, d_t]], dtype=torch.float64)
    for rule, expected in (("algorithm1", algorithm1), ("text", text)):
        got = switching_decision(rows, rule, fixed_delta=delta)[1]
        assert got.dtype == torch.bool and got.tolist() == [expected]


def test_algorithm1_is_absorbing_once_the_teacher_falls_behind():
    """docs/FIDELITY.md: G >= |d_s - d_t| for batch means, so with d_t = x d_s and x (1 + exp(-x/(1+x))) > 2
    (x > 1.273) G > delta holds for EVERY batch; the text's rule keeps the pair in learning mode there."""
    torch.manual_seed(3)
    behind = 0
    for _ in range(200):  # random batches whose teacher is far from the labels, the student near them
        y = torch.randint(0, 10, (16,))
        z_s = F.one_hot(y, 10).double() * 6 + torch.randn(16, 10, dtype=torch.float64)
        z_t = torch.randn(16, 10, dtype=torch.float64) * 2
        gap, d_s, d_t = (v.item() for v in (distillation_gap(z_s, z_t), label_distance(z_s, y), label_distance(z_t, y)))
        x = d_t / d_s
        assert gap >= abs(d_s - d_t) - 1e-12                           # the bound the argument rests on
        if x * (1 + math.exp(-x / (1 + x))) > 2:
            delta = adaptive_threshold(d_s, d_t)
            assert expert_mode(gap, delta, d_s, d_t, rule="algorithm1")   # absorbing
            assert not expert_mode(gap, delta, d_s, d_t, rule="text")     # the text's rule: back to learning
            behind += 1
    assert behind > 100
    # at the minimum G = d_t - d_s the threshold x* = 1.273 is sharp
    for x, expert in ((1.26, False), (1.29, True)):
        d_s, d_t = 0.5, 0.5 * x
        assert expert_mode(d_t - d_s, adaptive_threshold(d_s, d_t), d_s, d_t, rule="algorithm1") is expert


def test_mode_decision_from_constructed_logits():
    # Teacher (0.8, 0.2, 0): d_t = 0.4. A student near it, (0.6, 0.3, 0.1): G = 0.4 <= delta = 0.51.
    # A student erring elsewhere, (0.2, 0, 0.8): G = 1.6 > delta = 1.6 - exp(-0.2) 0.4 = 1.27.
    y = torch.tensor([0])
    teacher = logits_for([[0.8, 0.2, 1e-12]])
    for student, expert in ((logits_for([[0.6, 0.3, 0.1]]), False),
                            (logits_for([[0.2, 1e-12, 0.8]]), True)):
        gap = distillation_gap(student, teacher).item()
        delta = switching_threshold(student, teacher, y).item()
        d_s, d_t = label_distance(student, y).item(), label_distance(teacher, y).item()
        assert expert_mode(gap, delta, d_s, d_t, rule="algorithm1") is expert
        # switching_statistics + switching_decision reach the same G, delta and mode
        stats = switching_statistics(student, teacher, y)
        torch.testing.assert_close(stats, torch.tensor([gap, d_s, d_t], dtype=torch.float64))
        got_delta, got_expert = switching_decision(stats, "algorithm1")
        assert got_delta.item() == pytest.approx(delta)
        assert got_expert.item() is expert


def test_switching_decision_options():
    # rows of (G, d_s, d_t), one per pair: Eqn. (13) per row, a fixed delta, no switching, another pair's epsilon
    stats = torch.tensor([[0.9, 1.2, 0.4], [0.3, 1.2, 0.4], [0.9, 0.4, 1.2]], dtype=torch.float64)
    delta, expert = switching_decision(stats)
    torch.testing.assert_close(delta, torch.tensor([adaptive_threshold(d_s, d_t) for _, d_s, d_t in stats.tolist()],
                                                   dtype=torch.float64))
    assert expert.tolist() == [True, False, False]  # the default rule is the text's
    assert switching_decision(stats, "algorithm1")[1].tolist() == [True, False, True]
    delta, expert = switching_decision(stats, "algorithm1", fixed_delta=0.5)
    assert delta.tolist() == [0.5] * 3 and expert.tolist() == [True, False, True]
    assert switching_decision(stats, "algorithm1", fixed_delta=0.0, switching=False)[1].tolist() == [False] * 3
    ratio = switching_decision(stats, r_form="ratio")[0][0].item()
    assert ratio == pytest.approx(adaptive_threshold(1.2, 0.4, "ratio"))
    # epsilon = exp(-r) from another pair's distances: delta = d_s - exp(-r') d_t
    other = stats.flip(0)
    delta, _ = switching_decision(stats, epsilon_stats=other)
    # row 0 takes r from row 2's (d_s, d_t) = (0.4, 1.2), row 2 from row 0's (1.2, 0.4)
    assert delta[0].item() == pytest.approx(1.2 - math.exp(-1.2 / 1.6) * 0.4)
    assert delta[2].item() == pytest.approx(0.4 - math.exp(-0.4 / 1.6) * 1.2)
    assert adaptive_threshold(1.2, 0.4, epsilon_distances=(0.4, 1.2)) == pytest.approx(delta[0].item())


def test_kl_loss_scaling_and_detach():
    torch.manual_seed(3)
    z_t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z_s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    plain = (F.softmax(z_t / 2, 1) * (F.log_softmax(z_t / 2, 1) - F.log_softmax(z_s / 2, 1))).sum(1).mean()
    assert kl_loss(z_t, z_s, tau=2.0).item() == pytest.approx(4 * plain.item())  # tau^2, batchmean
    kl_loss(z_t, z_s).backward()
    assert z_t.grad is None and z_s.grad is not None
    kl_loss(z_t, z_s, detach=False).backward()
    assert z_t.grad is not None


def test_kl_term_by_hand():
    p_t, p_s = [[0.5, 0.5]], [[0.8, 0.2]]
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert kl_loss(logits_for(p_t), logits_for(p_s)).item() == pytest.approx(expected)


def test_losses_by_hand():
    z_s, z_t, y = logits_for([[0.8, 0.2]]), logits_for([[0.5, 0.5]]), torch.tensor([0])
    kl_ts = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    kl_st = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    total, ce, kl = student_loss(z_s, z_t, y, alpha=0.5)
    assert ce.item() == pytest.approx(-math.log(0.8))
    assert total.item() == pytest.approx(-math.log(0.8) + 0.5 * kl_ts)
    total, ce, kl = teacher_loss(z_t, z_s, y, beta=2.0)
    assert total.item() == pytest.approx(-math.log(0.5) + 2.0 * kl_st)
    total, _, _ = teacher_loss(z_t, z_s, y, beta=2.0, reciprocal=False)
    assert total.item() == pytest.approx(-math.log(0.5))   # Eqn. (5): CE alone


@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_student_gradient_is_eqn7_and_eqn9(tau, alpha):
    # dL_s/dz_s = (p_s^1 - y) + alpha tau (p_s^tau - p_t^tau), per sample; the batch mean adds 1/N.
    torch.manual_seed(1)
    n, k = 6, 5
    z_s = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, k, (n,))
    student_loss(z_s, z_t, y, alpha, tau)[0].backward()
    onehot = F.one_hot(y, k).double()
    expected = (F.softmax(z_s, 1) - onehot) + alpha * tau * (F.softmax(z_s / tau, 1) - F.softmax(z_t / tau, 1))
    torch.testing.assert_close(z_s.grad, expected.detach() / n)
    assert z_t.grad is None  # the teacher's prediction is a detached target


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_teacher_gradient_is_eqn7(tau):
    torch.manual_seed(2)
    n, k, beta = 4, 7, 0.7
    z_t = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    z_s = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, k, (n,))
    teacher_loss(z_t, z_s, y, beta, tau)[0].backward()
    onehot = F.one_hot(y, k).double()
    expected = (F.softmax(z_t, 1) - onehot) + beta * tau * (F.softmax(z_t / tau, 1) - F.softmax(z_s / tau, 1))
    torch.testing.assert_close(z_t.grad, expected.detach() / n)
    assert z_s.grad is None

"""The equations of SwitOKD against hand computations and autograd."""
import math

import pytest
import torch
import torch.nn.functional as F

from train_switokd import (adaptive_threshold, distillation_gap, distillation_loss, expert_mode,
                           label_distance, student_loss, switching_threshold, teacher_loss)


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
        expert_mode(1.0, 0.5, rule="sometimes")


@pytest.mark.parametrize("gap,delta,d_s,d_t,paper,official", [
    (0.9, 0.5, 1.2, 0.4, True, True),     # G > delta, teacher closer to labels
    (0.3, 0.5, 1.2, 0.4, False, False),   # G <= delta: learning mode under both rules
    (0.5, 0.5, 1.2, 0.4, False, False),   # G == delta is learning mode (Algorithm 1, line 5)
    (0.9, 0.5, 0.4, 1.2, True, False),    # student closer to labels: the released rule refuses
])
def test_mode_decision(gap, delta, d_s, d_t, paper, official):
    assert expert_mode(gap, delta, d_s, d_t, rule="paper") is paper
    assert expert_mode(gap, delta, d_s, d_t, rule="official") is official


def test_mode_decision_from_constructed_logits():
    # Teacher (0.8, 0.2, 0): d_t = 0.4. A student near it, (0.6, 0.3, 0.1): G = 0.4 <= delta = 0.51.
    # A student erring elsewhere, (0.2, 0, 0.8): G = 1.6 > delta = 1.6 - exp(-0.2) 0.4 = 1.27.
    y = torch.tensor([0])
    teacher = logits_for([[0.8, 0.2, 1e-12]])
    for student, expert in ((logits_for([[0.6, 0.3, 0.1]]), False),
                            (logits_for([[0.2, 1e-12, 0.8]]), True)):
        gap = distillation_gap(student, teacher).item()
        delta = switching_threshold(student, teacher, y).item()
        assert expert_mode(gap, delta, rule="paper") is expert


def test_kl_term_by_hand():
    p_t, p_s = [[0.5, 0.5]], [[0.8, 0.2]]
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert distillation_loss(logits_for(p_t), logits_for(p_s)).item() == pytest.approx(expected)


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

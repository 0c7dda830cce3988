"""train_switokd.py end to end: the two modes, the ablation flags, the recorded trace."""
import json
import math

import numpy as np
import pytest
import torch

import train_switokd
import utils

TINY = ["--dataset", "synthetic", "--train-subset", "96", "--test-subset", "48", "--batch-size", "32",
        "--workers", "0", "--no-progress", "--student", "resnet20", "--teacher", "wrn_16_1"]
ALWAYS_EXPERT = ["--fixed-delta", "-1"]     # G >= 0 > -1: every batch in expert mode
ALWAYS_LEARNING = ["--fixed-delta", "3"]    # G <= 2 < 3: every batch in learning mode


def train(tmp_path, name, *flags, epochs=1):
    return train_switokd.main([*TINY, "--epochs", str(epochs), "--out", str(tmp_path),
                               "--run-name", name, *flags])


def trace(tmp_path, name):
    return dict(np.load(tmp_path / "switokd" / name / "switching.npz"))


def checkpoint(tmp_path, name):
    return torch.load(tmp_path / "switokd" / name / "last.pt", weights_only=False)


def first_epoch_then(tmp_path, monkeypatch, name, *flags):
    """Epoch 1 in learning mode (so both optimisers hold state), then epoch 2 with ``flags``."""
    original = utils.Run.end_epoch

    def stop_after_epoch_one(self, extra=None):
        original(self, extra)
        raise KeyboardInterrupt
    monkeypatch.setattr(utils.Run, "end_epoch", stop_after_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, name, *ALWAYS_LEARNING, epochs=2)
    monkeypatch.setattr(utils.Run, "end_epoch", original)
    before = checkpoint(tmp_path, name)
    train(tmp_path, name, *flags, "--resume", epochs=2)
    return before, checkpoint(tmp_path, name)


def parameters_equal(before, after, role):
    names = [n for n in before["models"][role] if "running" not in n and "num_batches" not in n]
    return {n: torch.equal(before["models"][role][n], after["models"][role][n]) for n in names}


def test_expert_mode_pauses_the_teacher_bit_for_bit(tmp_path, monkeypatch):
    before, after = first_epoch_then(tmp_path, monkeypatch, "expert", *ALWAYS_EXPERT)
    assert trace(tmp_path, "expert")["expert"].tolist() == [0, 0, 0, 1, 1, 1]
    assert all(parameters_equal(before, after, "teacher").values())
    teacher_before, teacher_after = before["optimizers"]["teacher"], after["optimizers"]["teacher"]
    for index, state in teacher_before["state"].items():
        for key, value in state.items():   # Adam: step count and both moments
            assert torch.equal(value, teacher_after["state"][index][key]), key
    assert not any(parameters_equal(before, after, "student").values())
    assert after["optimizers"]["student"]["state"][0]["step"] == 6


def test_learning_mode_updates_both(tmp_path, monkeypatch):
    before, after = first_epoch_then(tmp_path, monkeypatch, "learning", *ALWAYS_LEARNING)
    assert not any(parameters_equal(before, after, "teacher").values())
    assert not any(parameters_equal(before, after, "student").values())
    assert after["optimizers"]["teacher"]["state"][0]["step"] == 6


def test_trace_and_results(tmp_path):
    results = train(tmp_path, "default", epochs=2)
    t = trace(tmp_path, "default")
    assert len(t["G"]) == 6 and t["epoch"].tolist() == [1, 1, 1, 2, 2, 2]
    for key in ("G", "delta", "ps_y", "pt_y", "student_ce", "student_kl", "teacher_ce", "teacher_kl"):
        assert np.isfinite(t[key]).all(), key
    np.testing.assert_allclose(t["delta"], t["ps_y"] - np.exp(-t["pt_y"] / (t["ps_y"] + t["pt_y"])) * t["pt_y"],
                               rtol=1e-5)
    np.testing.assert_array_equal(t["expert"], t["G"] > t["delta"])
    assert results["expert_fraction"] == pytest.approx(t["expert"].mean())
    assert results["iterations"] == 6 and results["switching"]["rule"] == "paper"
    assert set(results["networks"]) == {"student", "teacher"}
    rows = [json.loads(line) for line in (tmp_path / "switokd/default/metrics.jsonl").read_text().splitlines()]
    assert {"switch/expert_fraction", "time/expert_s", "time/learning_s",
            "test/student/top1", "test/teacher/top1"} <= rows[0].keys()


def test_case_a_never_switches(tmp_path):
    results = train(tmp_path, "a", "--no-switching")
    assert results["expert_fraction"] == 0 and trace(tmp_path, "a")["expert"].sum() == 0


def test_case_b_fixed_threshold(tmp_path):
    train(tmp_path, "b", "--fixed-delta", "0.6")
    t = trace(tmp_path, "b")
    assert (t["delta"] == np.float32(0.6)).all()
    np.testing.assert_array_equal(t["expert"], t["G"] > 0.6)


def test_case_c_independent_teacher_differs(tmp_path):
    train(tmp_path, "d", *ALWAYS_LEARNING)
    train(tmp_path, "c", *ALWAYS_LEARNING, "--teacher-loss", "independent")
    d, c = checkpoint(tmp_path, "d"), checkpoint(tmp_path, "c")
    assert not all(parameters_equal(d, c, "teacher").values())
    # the first batch's teacher CE is the same: only the loss it learns from differs
    assert trace(tmp_path, "c")["teacher_ce"][0] == trace(tmp_path, "d")["teacher_ce"][0]


def test_ratio_form_of_fig4e(tmp_path):
    train(tmp_path, "e", "--r-form", "ratio")
    t = trace(tmp_path, "e")
    np.testing.assert_allclose(t["delta"], t["ps_y"] - np.exp(-t["pt_y"] / t["ps_y"]) * t["pt_y"], rtol=1e-5)


def test_temperature_softens_the_gap(tmp_path):
    train(tmp_path, "t1")
    train(tmp_path, "t8", "--tau", "8")
    # same initialisation and first batch: a higher temperature gives a smaller gap
    assert trace(tmp_path, "t8")["G"][0] < trace(tmp_path, "t1")["G"][0]


def test_official_switch_rule(tmp_path):
    results = train(tmp_path, "o", "--switch-rule", "official")
    t = trace(tmp_path, "o")
    np.testing.assert_array_equal(t["expert"], (t["G"] > t["delta"]) & (t["pt_y"] < t["ps_y"]))
    assert results["switching"]["rule"] == "official"


def test_official_recipe_implies_official_rule():
    args = train_switokd.parse_args(["--recipe", "official"])
    assert args.switch_rule == "official"
    args = train_switokd.parse_args([])
    assert (args.switch_rule, args.student, args.teacher, args.dataset) == \
        ("paper", "mobilenetv2_0.5", "wrn_16_2", "cifar100")


def test_digits_end_to_end(tmp_path):
    results = train_switokd.main(["--dataset", "digits", "--student", "resnet20", "--teacher", "wrn_16_1",
                                  "--epochs", "1", "--batch-size", "64", "--train-subset", "512",
                                  "--workers", "0", "--no-progress", "--out", str(tmp_path)])
    assert results["iterations"] == 8
    assert math.isfinite(results["networks"]["student"]["best_top1"])
    assert (tmp_path / "switokd" / "digits-resnet20-wrn_16_1-seed0" / "results.json").is_file()

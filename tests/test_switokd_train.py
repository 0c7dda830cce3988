"""train_switokd.py end to end: the two modes, the ablation flags, the recorded trace."""
import json
import math

import numpy as np
import pytest
import torch

import distill
import train_switokd
import utils

TINY = ["--dataset", "synthetic", "--train-subset", "96", "--test-subset", "48", "--batch-size", "32",
        "--workers", "0", "--no-progress", "--student", "resnet20", "--teacher", "wrn_16_1"]
ALWAYS_EXPERT = ["--switch-rule", "algorithm1", "--fixed-delta", "0"]  # G > 0 every batch: expert mode
ALWAYS_LEARNING = ["--no-switching"]                                    # Table 2 case A: learning mode


def train(tmp_path, name, *flags, epochs=1):
    return train_switokd.main([*TINY, "--epochs", str(epochs), "--out", str(tmp_path),
                               "--run-name", name, *flags])


def trace(tmp_path, name):
    return dict(np.load(tmp_path / "switokd" / name / "switching.npz"))


def checkpoint(tmp_path, name):
    return torch.load(tmp_path / "switokd" / name / "last.pt", weights_only=False)


def first_epoch_then(tmp_path, monkeypatch, interrupted_after, name, *flags):
    """A run with ``flags``: epoch 1 forced into learning mode (so both optimisers hold state),
    stopped after it, then resumed (same flags, as --resume demands) for epoch 2 as ``flags`` decide."""
    decide = train_switokd.switching_decision

    def always_learning(*args, **kwargs):
        delta, expert = decide(*args, **kwargs)
        return delta, torch.zeros_like(expert)
    monkeypatch.setattr(train_switokd, "switching_decision", always_learning)
    with interrupted_after(1):
        train(tmp_path, name, *flags, epochs=2)
    monkeypatch.setattr(train_switokd, "switching_decision", decide)
    before = checkpoint(tmp_path, name)
    assert before["epoch"] == 1
    train(tmp_path, name, *flags, "--resume", epochs=2)
    return before, checkpoint(tmp_path, name)


def parameters_equal(before, after, role):
    names = [n for n in before["models"][role] if "running" not in n and "num_batches" not in n]
    return {n: torch.equal(before["models"][role][n], after["models"][role][n]) for n in names}


def test_expert_mode_pauses_the_teacher_bit_for_bit(tmp_path, monkeypatch, interrupted_after):
    before, after = first_epoch_then(tmp_path, monkeypatch, interrupted_after, "expert", *ALWAYS_EXPERT)
    assert trace(tmp_path, "expert")["expert"].tolist() == [0, 0, 0, 1, 1, 1]
    assert all(parameters_equal(before, after, "teacher").values())
    teacher_before, teacher_after = before["optimizers"]["teacher"], after["optimizers"]["teacher"]
    for index, state in teacher_before["state"].items():
        for key, value in state.items():   # Adam: step count and both moments
            assert torch.equal(value, teacher_after["state"][index][key]), key
    assert not any(parameters_equal(before, after, "student").values())
    assert after["optimizers"]["student"]["state"][0]["step"] == 6


def test_learning_mode_updates_both(tmp_path, monkeypatch, interrupted_after):
    before, after = first_epoch_then(tmp_path, monkeypatch, interrupted_after, "learning", *ALWAYS_LEARNING)
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
    np.testing.assert_array_equal(t["expert"], (t["G"] > t["delta"]) & (t["pt_y"] < t["ps_y"]))  # the text's rule
    assert results["expert_fraction"] == pytest.approx(t["expert"].mean())
    assert results["iterations"] == 6 and results["switching"]["rule"] == "text"
    assert set(results["networks"]) == {"student", "teacher"}
    rows = [json.loads(line) for line in (tmp_path / "switokd/default/metrics.jsonl").read_text().splitlines()]
    assert {"switch/expert_fraction", "time/expert_s", "time/learning_s", "train/student_ce", "train/teacher_kl",
            "test/student/top1", "test/teacher/top1", "lr/student", "lr/teacher"} <= rows[0].keys()
    assert [row["switch/expert_fraction"] for row in rows] == pytest.approx(
        [t["expert"][t["epoch"] == e].mean() for e in (1, 2)])
    assert len(t["seconds"]) == 6 and (t["seconds"] > 0).all()
    assert sum(row["time/expert_s"] + row["time/learning_s"] for row in rows) == pytest.approx(
        float(t["seconds"].sum()), rel=1e-4)


def test_case_a_never_switches(tmp_path):
    results = train(tmp_path, "a", "--no-switching")
    assert results["expert_fraction"] == 0 and trace(tmp_path, "a")["expert"].sum() == 0


def test_case_b_fixed_threshold(tmp_path):
    train(tmp_path, "b", "--fixed-delta", "0.6")
    t = trace(tmp_path, "b")
    assert (t["delta"] == np.float32(0.6)).all()
    np.testing.assert_array_equal(t["expert"], (t["G"] > 0.6) & (t["pt_y"] < t["ps_y"]))


@pytest.mark.parametrize("value", ["-1", "3", "nan", "x"])
def test_fixed_delta_outside_its_range_is_refused(value, capsys):
    # G lies in [0, 2]: a threshold outside it is no ablation (force the modes with the rule flags instead)
    with pytest.raises(SystemExit) as e:
        train_switokd.parse_args(["--fixed-delta", value])
    assert e.value.code == 2
    assert "--fixed-delta" in capsys.readouterr().err
    assert train_switokd.parse_args(["--fixed-delta", "2"]).fixed_delta == 2.0


def test_forced_modes(tmp_path):
    train(tmp_path, "x", *ALWAYS_EXPERT)
    train(tmp_path, "l", *ALWAYS_LEARNING)
    assert trace(tmp_path, "x")["expert"].tolist() == [1, 1, 1]
    assert trace(tmp_path, "l")["expert"].tolist() == [0, 0, 0]


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


def test_algorithm1_switch_rule(tmp_path):
    results = train(tmp_path, "o", "--switch-rule", "algorithm1")
    t = trace(tmp_path, "o")
    np.testing.assert_array_equal(t["expert"], t["G"] > t["delta"])
    assert results["switching"]["rule"] == "algorithm1"


def test_switch_rule_defaults_to_the_text_under_every_recipe():
    for recipe in utils.RECIPE_NAMES:
        assert train_switokd.parse_args(["--recipe", recipe]).switch_rule == "text"
    args = train_switokd.parse_args([])
    assert (args.switch_rule, args.student, args.teacher, args.dataset) == \
        ("text", "mobilenetv2_0.5", "wrn_16_2", "cifar100")
    for old in ("paper", "official"):
        with pytest.raises(SystemExit):
            train_switokd.parse_args(["--switch-rule", old])


def test_train_step_modes():
    """One train_step: the trace values as floats; expert mode leaves the teacher and its optimiser alone."""
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(12, 5), torch.nn.Linear(12, 5)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    images, targets = torch.randn(8, 12), torch.randint(0, 5, (8,))
    precision = utils.Precision(torch.device("cpu"))
    # expert first (the teacher's optimiser has no state yet), learning, then expert again (the
    # teacher's gradients of the learning step are still there: they must not be applied)
    for flags, expert in ((ALWAYS_EXPERT, True), (ALWAYS_LEARNING, False), (ALWAYS_EXPERT, True)):
        cfg = train_switokd.parse_args(flags)
        s0, t0 = student.weight.clone(), teacher.weight.clone()
        momentum = {k: v["momentum_buffer"].clone() for k, v in opt_t.state.items()}
        with torch.no_grad():
            stats = distill.switching_statistics(student(images), teacher(images), targets)
        values = train_switokd.train_step(student, teacher, opt_s, opt_t, images, targets, cfg, precision)
        assert tuple(values) == train_switokd.TRACE and all(type(v) is float for v in values.values())
        assert values["expert"] == float(expert)
        # the logged statistics are those of the batch before the step
        assert [values["G"], values["ps_y"], values["pt_y"]] == pytest.approx(stats.tolist())
        assert not torch.equal(student.weight, s0)
        assert torch.equal(teacher.weight, t0) is expert
        after = {k: v["momentum_buffer"] for k, v in opt_t.state.items()}
        assert (after.keys() == momentum.keys() and all(torch.equal(after[k], momentum[k]) for k in after)) is expert
        delta = distill.adaptive_threshold(values["ps_y"], values["pt_y"]) if cfg.fixed_delta is None else 0.0
        assert values["delta"] == pytest.approx(delta)


def test_digits_end_to_end(tmp_path):
    results = train_switokd.main(["--dataset", "digits", "--student", "resnet20", "--teacher", "wrn_16_1",
                                  "--epochs", "1", "--batch-size", "64", "--train-subset", "512",
                                  "--workers", "0", "--no-progress", "--out", str(tmp_path)])
    assert results["iterations"] == 8 and results["status"] == "finished"
    assert math.isfinite(results["networks"]["student"]["best_top1"])
    # the default run name names every flag given a non-default value (not --epochs, --workers, --out, ...)
    run = tmp_path / "switokd" / "digits-resnet20-wrn_16_1-train_subset=512-batch_size=64-seed0"
    assert (run / "results.json").is_file()


def test_resume_continues_exactly(tmp_path, interrupted_after):
    """Stopped after epoch 1 and resumed: the same weights, optimiser states, trace and metrics as one run."""
    train(tmp_path, "straight", epochs=2)
    with interrupted_after(1):
        train(tmp_path, "resumed", epochs=2)
    results = train(tmp_path, "resumed", "--resume", epochs=2)
    straight, resumed = checkpoint(tmp_path, "straight"), checkpoint(tmp_path, "resumed")
    for role in ("student", "teacher"):
        assert all(torch.equal(v, resumed["models"][role][k]) for k, v in straight["models"][role].items()), role
        for index, state in straight["optimizers"][role]["state"].items():
            assert all(torch.equal(v, resumed["optimizers"][role]["state"][index][k]) for k, v in state.items())
    a, b = trace(tmp_path, "straight"), trace(tmp_path, "resumed")
    assert a.keys() == b.keys()
    for key in a.keys() - {"seconds"}:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    def without_times(rows):
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]
    assert without_times(resumed["history"]) == without_times(straight["history"])
    assert results["iterations"] == 6 and results["expert_fraction"] == pytest.approx(b["expert"].mean())

"""The shared engine through train_vanilla.py: run directory, logs, resume, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_vanilla
import utils

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--train-subset", "96", "--test-subset", "48", "--batch-size", "32",
        "--workers", "0", "--no-progress"]


def vanilla(tmp_path, *extra):
    return train_vanilla.main([*TINY, "--model", "resnet20", "--out", str(tmp_path), *extra])


def test_vanilla_run_directory(tmp_path):
    results = vanilla(tmp_path, "--epochs", "2", "--run-name", "r")
    run_dir = tmp_path / "vanilla" / "r"
    for name in ("last.pt", "best_student.pt", "metrics.jsonl", "results.json", "args.json"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train/loss", "test/student/top1", "test/student/top5", "lr/student"} <= rows[0].keys()

    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["epochs"] == 2 and on_disk["method"] == "vanilla"
    net = on_disk["networks"]["student"]
    assert net["arch"] == "resnet20" and net["params"] > 0
    assert net["best_top1"] == max(r["test/student/top1"] for r in rows)
    assert net["final_top1"] == rows[-1]["test/student/top1"]
    assert on_disk["args"]["model"] == "resnet20" and on_disk["wall_time_s"] > 0
    assert results["networks"]["student"]["best_top1"] == net["best_top1"]

    best = torch.load(run_dir / "best_student.pt", weights_only=False)
    assert best["arch"] == "resnet20" and best["epoch"] == net["best_epoch"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "iter/loss" in tags and "test/student/top1" in tags
    assert len(events.Scalars("iter/loss")) == 2 * 3   # 96 images / 32 per batch, 2 epochs
    assert [e.value for e in events.Scalars("test/student/top1")] == pytest.approx(
        [r["test/student/top1"] for r in rows])


def test_resume_continues_exactly(tmp_path, monkeypatch):
    args = ["--epochs", "2"]
    vanilla(tmp_path, *args, "--run-name", "straight")

    original = utils.Run.end_epoch

    def crash_after_first_epoch(self, extra=None):
        original(self, extra)
        raise KeyboardInterrupt
    monkeypatch.setattr(utils.Run, "end_epoch", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        vanilla(tmp_path, *args, "--run-name", "resumed")
    monkeypatch.setattr(utils.Run, "end_epoch", original)
    assert torch.load(tmp_path / "vanilla/resumed/last.pt", weights_only=False)["epoch"] == 1
    vanilla(tmp_path, *args, "--run-name", "resumed", "--resume")

    straight = torch.load(tmp_path / "vanilla/straight/last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "vanilla/resumed/last.pt", weights_only=False)
    assert straight["epoch"] == resumed["epoch"] == 2
    for key, value in straight["models"]["student"].items():
        assert torch.equal(value, resumed["models"]["student"][key]), key
    for a, b in zip(straight["optimizers"]["student"]["state"].values(),
                    resumed["optimizers"]["student"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    lines = (tmp_path / "vanilla/resumed/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_milestones_scale_with_short_runs():
    recipe = utils.recipe_for("paper", "cifar100", "student")
    assert utils.scaled_milestones(recipe, 300) == [140, 200, 250]
    assert utils.scaled_milestones(recipe, 15) == [7, 10, 12]
    official = utils.recipe_for("official", "cifar100", "teacher"), utils.recipe_for("official", "cifar100", "student")
    assert (official[0].lr, official[1].lr) == (0.1, 0.01)
    assert utils.recipe_for("paper", "tinyimagenet", "teacher").optimizer == "sgd"


def run_cli(capsys, *args):
    """Run train_vanilla.py's entry point in-process; returns (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as stop:
        utils.main_guard(lambda: train_vanilla.main(list(args)))
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags,message", [
    (["--model", "resnet21"], "resnet21"),
    (["--dataset", "mnist"], "mnist"),
    (["--recipe", "fast"], "fast"),
    (["--batch-size", "many"], "many"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_input_is_one_line(tmp_path, capsys, flags, message):
    code, lines = run_cli(capsys, *TINY, "--out", str(tmp_path), "--epochs", "1", *flags)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_missing_dataset_says_where(tmp_path, capsys):
    code, lines = run_cli(capsys, "--dataset", "tinyimagenet", "--data-root", str(tmp_path / "nowhere"),
                          "--out", str(tmp_path), "--no-progress")
    assert code == 2 and len(lines) == 1 and "nowhere" in lines[0], lines


def test_corrupt_checkpoint_and_existing_run(tmp_path, capsys):
    args = [*TINY, "--model", "resnet20", "--out", str(tmp_path), "--epochs", "1", "--run-name", "r"]
    train_vanilla.main(args)
    code, lines = run_cli(capsys, *args)
    assert code == 2 and "--resume" in lines[0]
    (tmp_path / "vanilla/r/last.pt").write_bytes(b"not a checkpoint")
    code, lines = run_cli(capsys, *args, "--resume")
    assert code == 2 and len(lines) == 1 and "last.pt" in lines[0], lines


def test_command_line_exit_status(tmp_path):
    """The real command line: a bad model name ends with status 2 and one line on stderr."""
    done = subprocess.run([sys.executable, "train_vanilla.py", "--model", "resnet21", *TINY,
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("train_vanilla.py: error: unknown model 'resnet21'; choose from")

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
    assert on_disk["epochs"] == 2 and on_disk["method"] == "vanilla" and on_disk["status"] == "finished"
    net = on_disk["networks"]["student"]
    assert net["arch"] == "resnet20" and net["params"] > 0
    # the resolved optimisation of the network (the paper's CIFAR recipe; 2 of 300 epochs scale the milestones)
    assert (net["optimizer"], net["lr"], net["weight_decay"], net["lr_drop"], net["variant"]) == \
        ("adam", 0.01, 1e-4, "after", "paper")
    assert net["milestones"] == utils.scaled_milestones(utils.recipe_for("paper", "synthetic", "student"), 2)
    assert on_disk["settings"]["batch_size"] == 32 and on_disk["settings"]["world_size"] == 1
    assert on_disk["provenance"]["torch"] == torch.__version__ and "git_commit" in on_disk["provenance"]
    assert [i["from_epoch"] for i in on_disk["invocations"]] == [0]
    assert net["best_top1"] == max(r["test/student/top1"] for r in rows)
    assert net["final_top1"] == rows[-1]["test/student/top1"]
    assert on_disk["args"]["model"] == "resnet20" and on_disk["wall_time_s"] > 0
    assert results["networks"]["student"]["best_top1"] == net["best_top1"]

    best = torch.load(run_dir / "best_student.pt", weights_only=False)
    assert best["arch"] == "resnet20" and best["epoch"] == net["best_epoch"]
    last = torch.load(run_dir / "last.pt", weights_only=False)
    assert (last["method"], last["epoch"], last["epochs_planned"]) == ("vanilla", 2, 2)
    assert last["milestones"]["student"] == net["milestones"] and len(last["invocations"]) == 1
    assert last["identity"]["model"] == "resnet20" and "epochs" not in last["identity"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "iter/loss" in tags and "test/student/top1" in tags
    assert len(events.Scalars("iter/loss")) == 2 * 3   # 96 images / 32 per batch, 2 epochs
    assert [e.value for e in events.Scalars("test/student/top1")] == pytest.approx(
        [r["test/student/top1"] for r in rows])


def without_times(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_resume_continues_exactly(tmp_path, interrupted_after):
    args = ["--epochs", "2"]
    vanilla(tmp_path, *args, "--run-name", "straight")

    with interrupted_after(1):
        vanilla(tmp_path, *args, "--run-name", "resumed")
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
    # the same losses and test metrics, epoch by epoch, and the same schedule
    assert without_times(resumed["history"]) == without_times(straight["history"])
    assert resumed["schedulers"]["student"] == straight["schedulers"]["student"]
    results = json.loads((tmp_path / "vanilla/resumed/results.json").read_text())
    assert [i["from_epoch"] for i in results["invocations"]] == [0, 1] and results["status"] == "finished"


def test_resume_refuses_changed_flags_and_fewer_epochs(tmp_path, capsys, interrupted_after):
    args = [*TINY, "--model", "resnet20", "--out", str(tmp_path), "--run-name", "r"]
    with interrupted_after(1):
        train_vanilla.main([*args, "--epochs", "3"])
    code, lines = run_cli(capsys, *args, "--epochs", "3", "--resume", "--lr", "0.5", "--seed", "1")
    assert code == 2 and len(lines) == 1, lines
    assert "--lr None -> 0.5" in lines[0] and "--seed 0 -> 1" in lines[0]
    code, lines = run_cli(capsys, *args, "--epochs", "2", "--resume")
    assert code == 2 and len(lines) == 1 and "--epochs" in lines[0], lines
    # --epochs may grow (the milestones stay those of the original plan); --workers may change
    planned = torch.load(tmp_path / "vanilla/r/last.pt", weights_only=False)["milestones"]
    results = train_vanilla.main([*args, "--epochs", "4", "--resume", "--workers", "1"])
    assert results["epochs"] == results["epochs_planned"] == 4
    assert results["networks"]["student"]["milestones"] == planned["student"]
    assert "extending from 3 to 4 epochs" in capsys.readouterr().err


def test_run_directory_is_locked(tmp_path, capsys):
    run_dir = tmp_path / "vanilla" / "r"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (  # another process holds the lock
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('pid 1 on elsewhere'); f.flush(); print('locked', flush=True); time.sleep(60)"),
        str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, lines = run_cli(capsys, *TINY, "--model", "resnet20", "--out", str(tmp_path), "--epochs", "1",
                              "--run-name", "r")
        assert code == 2 and len(lines) == 1 and "in use by pid 1 on elsewhere" in lines[0], lines
        assert not (run_dir / "last.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed: its lock file stays, but is no lock): the directory is free again
    vanilla(tmp_path, "--epochs", "1", "--run-name", "r")
    free = subprocess.run([sys.executable, "-c", "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a+'), "
                           "fcntl.LOCK_EX | fcntl.LOCK_NB)", str(run_dir / ".lock")], timeout=60)
    assert free.returncode == 0  # the finished run released it


def test_milestones_scale_with_short_runs():
    recipe = utils.recipe_for("paper", "cifar100", "student")
    assert utils.scaled_milestones(recipe, 300) == [140, 200, 250]
    assert utils.scaled_milestones(recipe, 15) == [7, 10, 12]
    official = utils.recipe_for("official", "cifar100", "teacher"), utils.recipe_for("official", "cifar100", "student")
    assert (official[0].lr, official[1].lr) == (0.1, 0.01)
    assert utils.recipe_for("paper", "tinyimagenet", "teacher").optimizer == "sgd"
    # by network, then role (a numbered role takes its kind's entry), then "*"; a released script's own table
    assert utils.recipe_for("official", "cifar100", "teacher2").lr == 0.1
    assert utils.recipe_for("official", "synthetic", "student1", "mobilenet", "three-networks").optimizer == "adam"
    assert utils.recipe_for("official", "cifar100", "student1", "wrn_16_2", "three-networks").optimizer == "sgd"
    assert utils.recipe_for("crd", "cifar100", "student", "mobilenetv2_0.5").lr == 0.01
    with pytest.raises(utils.UsageError, match="fast"):
        utils.recipe_for("fast", "cifar100", "student")


@pytest.mark.parametrize("lr_drop, rates", [
    ("after", [1, 1, 1, 0.1, 0.1, 0.01]),   # milestone m: m epochs at the old rate (MultiStepLR)
    ("start", [1, 1, 0.1, 0.1, 0.01, 0.01]),  # at the start of epoch m (the released scripts)
])
def test_lr_drop_timing(lr_drop, rates):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = utils.lr_schedule(optimizer, [3, 5], 0.1, lr_drop)
    seen = []
    for _ in range(6):  # epochs 1..6: the rate each epoch trains at
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(rates)


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
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--batch"], "--batch"),  # no abbreviations
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

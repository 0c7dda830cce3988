"""A run's record never lies, and bad input never costs a traceback (issue 12).

Resume continues only the same run; results.json records the resolved settings and the
code version; the console says what happens also when redirected; evaluate.py reproduces
the recorded accuracy; every bad input gives one line and exit 2; a diverged run stops
with exit 3 and keeps its last good checkpoint; a run directory is locked; a finished run
resumed after a crash rebuilds its files from last.pt.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_kdcl
import train_switokd
import utils

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--train-subset", "32", "--test-subset", "16", "--batch-size", "16",
        "--workers", "0", "--no-progress", "--student", "wrn_10_1", "--teacher", "wrn_10_1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def switokd(tmp_path, *flags, epochs=1, name="r"):
    return train_switokd.main([*TINY, "--epochs", str(epochs), "--out", str(tmp_path), "--run-name", name, *flags])



# --------------------------------------------------------------------------- resume

def test_resume_refuses_a_changed_method_flag(cli, tmp_path, interrupted_after):
    with interrupted_after(1):
        switokd(tmp_path, "--teacher-loss", "independent", epochs=2)
    code, lines = cli(train_switokd.main, *TINY, "--epochs", "2", "--out", str(tmp_path), "--run-name", "r",
                      "--resume")
    assert code == 2 and len(lines) == 1
    assert "--teacher-loss independent -> reciprocal" in lines[0]
    code, lines = cli(train_switokd.main, *TINY, "--epochs", "2", "--out", str(tmp_path), "--run-name", "r",
                      "--resume", "--teacher-loss", "independent", "--tau", "2")
    assert code == 2 and "--tau 1.0 -> 2.0" in lines[0] and "teacher-loss" not in lines[0]


def test_resume_extends_with_more_epochs_and_refuses_fewer(cli, tmp_path):
    switokd(tmp_path, epochs=2)
    code, lines = cli(train_switokd.main, *TINY, "--epochs", "1", "--out", str(tmp_path), "--run-name", "r",
                      "--resume")
    assert code == 2 and "--epochs 1 is below the 2" in lines[0]
    results = switokd(tmp_path, "--resume", epochs=3)
    assert results["epochs"] == 3 and results["status"] == "finished"
    assert [i["from_epoch"] for i in results["invocations"]] == [0, 2]
    milestones = results["networks"]["student"]["milestones"]
    assert milestones == utils.scaled_milestones(utils.recipe_for("paper", "synthetic", "student"), 2)


def test_resume_finds_a_moved_run_under_its_spelled_out_name(tmp_path, interrupted_after):
    flags = [*TINY, "--epochs", "2"]
    with interrupted_after(1):
        train_switokd.main([*flags, "--out", str(tmp_path / "a")])  # the default run name
    [run] = (tmp_path / "a" / "switokd").iterdir()
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # --out and --run-name only locate the run
    results = train_switokd.main([*flags, "--out", str(tmp_path / "b"), "--run-name", run.name, "--resume"])
    assert results["status"] == "finished" and [i["from_epoch"] for i in results["invocations"]] == [0, 1]


def test_resume_without_a_previous_run_refuses_and_leaves_nothing(cli, tmp_path):
    code, lines = cli(train_switokd.main, *TINY, "--epochs", "1", "--out", str(tmp_path), "--run-name", "r",
                      "--resume")
    assert code == 2 and len(lines) == 1 and "no run to continue" in lines[0] and "no last.pt" in lines[0]
    assert not (tmp_path / "switokd" / "r").exists()


def test_resume_refuses_another_methods_checkpoint(cli, tmp_path):
    switokd(tmp_path)
    import train_dml
    (tmp_path / "dml").mkdir()
    os.rename(tmp_path / "switokd" / "r", tmp_path / "dml" / "r")
    code, lines = cli(train_dml.main, "--models", "wrn_10_1", "wrn_10_1", *TINY[:10], "--epochs", "1",
                      "--out", str(tmp_path), "--run-name", "r", "--resume")
    assert code == 2 and len(lines) == 1 and "not written by dml" in lines[0]


def test_finished_run_resumed_after_a_crash_rebuilds_its_files(tmp_path, monkeypatch):
    """A crash after the last epoch's last.pt but before switching.npz and results.json: resume replays them."""
    def crash(self, summary=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(utils.Run, "_write_derived", lambda self: None)
    monkeypatch.setattr(utils.Run, "finish", crash)
    with pytest.raises(KeyboardInterrupt):
        switokd(tmp_path, epochs=2)
    monkeypatch.undo()
    run_dir = tmp_path / "switokd" / "r"
    assert json.loads((run_dir / "results.json").read_text())["status"] == "unfinished"  # written each epoch
    assert not (run_dir / "switching.npz").exists()
    before = (run_dir / "last.pt").read_bytes()
    results = switokd(tmp_path, "--resume", epochs=2)
    assert (run_dir / "last.pt").read_bytes() == before  # nothing trained, nothing rewritten
    assert results["status"] == json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    trace = np.load(run_dir / "switching.npz")
    assert trace["epoch"].tolist() == [1, 1, 2, 2] and results["iterations"] == 4 and results["epochs"] == 2


def test_kdcl_general_weights_survive_a_finished_resume(tmp_path):
    flags = ["--models", "wrn_10_1", "wrn_10_1", *TINY[:10], "--epochs", "1", "--out", str(tmp_path),
             "--run-name", "g", "--ensemble", "general", "--holdout", "8"]
    first = train_kdcl.main(flags)
    again = train_kdcl.main([*flags, "--resume"])
    assert again["kdcl"]["general_weights"] == first["kdcl"]["general_weights"] is not None


# --------------------------------------------------------------------------- provenance and console

def test_results_record_resolved_settings_and_code_version(tmp_path):
    results = switokd(tmp_path, "--recipe", "official")
    teacher, student = results["networks"]["teacher"], results["networks"]["student"]
    assert (teacher["optimizer"], teacher["lr"], teacher["weight_decay"], teacher["momentum"]) == ("sgd", 0.1, 5e-4, 0.9)
    assert (student["lr"], student["lr_drop"], student["variant"]) == (0.01, "start", "official")
    assert results["settings"]["batch_size"] == 16 and results["settings"]["device"] == "cpu"
    provenance = results["provenance"]
    assert provenance["torch"] == torch.__version__ and provenance["git_commit"]
    assert isinstance(provenance["git_dirty"], bool)
    args = json.loads((tmp_path / "switokd" / "r" / "args.json").read_text())
    assert args["batch_size"] == 16 and args["test_batch_size"] == 100 and args["device"] == "cpu"


def test_default_run_names_differ_by_method_flag(tmp_path):
    plain = train_switokd.parse_args(TINY)
    independent = train_switokd.parse_args([*TINY, "--teacher-loss", "independent"])
    networks = {"student": "wrn_10_1", "teacher": "wrn_10_1"}
    assert utils.default_run_name(plain, networks) != utils.default_run_name(independent, networks)
    assert "teacher_loss=independent" in utils.default_run_name(independent, networks)
    import train_multi  # a default the recipe resolves is still a default: not in the name
    three = {"student1": "resnet20", "student2": "mobilenet", "teacher1": "wrn_16_2"}
    for recipe in ("paper", "official"):
        args = train_multi.parse_args(["--teachers", "wrn_16_2", "--students", "resnet20", "mobilenet",
                                       "--recipe", recipe])
        assert "paused_teacher" not in utils.default_run_name(args, three)
        assert "pair_epsilon" not in utils.default_run_name(args, three)
    import train_okddip  # a path without ':' (TensorBoard's and Windows' separator)
    args = train_okddip.parse_args(["--backbone", "resnet32"])
    assert utils.default_run_name(args, {"net": "okddip:resnet32"}) == "cifar100-okddip-resnet32-seed0"


def test_redirected_output_shows_banner_progress_and_epochs(tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "train_switokd.py", *[a for a in TINY if a != "--no-progress"],
                               "--epochs", "2", "--out", str(tmp_path), "--print-every", "1"],
                              cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "switokd: starting" in text and "student    wrn_10_1" in text     # banner with the networks
    assert "epoch 1/2 iter 1/2" in text                                      # plain progress lines
    assert "epoch 2/2  test student" in text and "ETA" in text               # one line per epoch
    assert "finished switokd" in text and "best" in text                     # the summary


# --------------------------------------------------------------------------- evaluate.py

def test_evaluate_reproduces_the_recorded_accuracy(tmp_path):
    import evaluate
    results = switokd(tmp_path, epochs=2)
    run_dir = tmp_path / "switokd" / "r"
    report = evaluate.main([str(run_dir), "--json"])
    for role in ("student", "teacher"):
        assert report["networks"][role]["top1"] == pytest.approx(results["networks"][role]["best_top1"], abs=0.01)
    report = evaluate.main([str(run_dir), "--weights", "last", "--json"])
    for role in ("student", "teacher"):
        assert report["networks"][role]["top1"] == pytest.approx(results["networks"][role]["final_top1"], abs=0.01)
    assert "ensemble" in report
    import models
    net = models.load(run_dir / "best_student.pt")
    assert not net.training and net.checkpoint["arch"] == "wrn_10_1"


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags,named", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
    (["--test-batch-size", "0"], "--test-batch-size"), (["--batch-size", "-4"], "--batch-size"),
    (["--lr", "-0.1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--train-subset", "0"], "--train-subset"), (["--test-subset", "0"], "--test-subset"),
    (["--log-interval", "0"], "--log-interval"), (["--alpha", "-1"], "--alpha"), (["--fixed-delta", "5"], "--fixed-delta"),
    (["--fixed-delta", "-1"], "--fixed-delta"), (["--fixed-delta", "nan"], "--fixed-delta"), (["--tau", "nan"], "--tau"),
    (["--teacher-los", "independent"], "--teacher-los"), (["--seed", "x"], "--seed"), (["--workers", "-1"], "--workers"),
])
def test_bad_numbers_and_abbreviations_are_one_line(cli, tmp_path, flags, named):
    code, lines = cli(train_switokd.main, *TINY, "--out", str(tmp_path), *flags)
    assert code == 2 and len(lines) == 1 and named in lines[0], lines


def test_lam_nan_is_refused(cli, tmp_path):
    code, lines = cli(train_kdcl.main, "--lam", "nan", "--out", str(tmp_path))
    assert code == 2 and len(lines) == 1 and "--lam" in lines[0]


@pytest.mark.parametrize("out", ["file", "file/below"])
def test_unusable_output_folder_is_one_line(cli, tmp_path, out):
    (tmp_path / "file").write_text("not a folder")
    code, lines = cli(train_switokd.main, *TINY, "--epochs", "1", "--out", str(tmp_path / out))
    assert code == 2 and len(lines) == 1 and "file" in lines[0], lines


def test_full_disk_is_one_line_naming_the_file(cli, tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nunexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    code, lines = cli(train_switokd.main, *TINY, "--epochs", "1", "--out", str(tmp_path))
    assert code == 2 and len(lines) == 1 and "cannot write" in lines[0] and ".pt" in lines[0], lines
    statvfs = os.statvfs(tmp_path)
    for free_blocks, free_inodes, words in ((0, 100, "no space left on device"), (10**6, 0, "no free inodes")):
        values = list(statvfs)
        values[4], values[7] = free_blocks, free_inodes  # f_bavail, f_favail
        monkeypatch.setattr(os, "statvfs", lambda path, v=values: os.statvfs_result(v))
        code, lines = cli(train_switokd.main, *TINY, "--epochs", "1", "--out", str(tmp_path / f"full{free_inodes}"))
        assert code == 2 and len(lines) == 1 and words in lines[0] and str(tmp_path) in lines[0], lines


def test_out_of_inodes_when_making_the_run_folder_is_one_line(cli, tmp_path, monkeypatch):
    def no_inodes(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "mkdir", no_inodes)
    code, lines = cli(train_switokd.main, *TINY, "--epochs", "1", "--out", str(tmp_path / "runs"))
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0] and "runs" in lines[0], lines


def test_stale_temporaries_are_cleaned_at_start(tmp_path):
    switokd(tmp_path)
    run_dir = tmp_path / "switokd" / "r"
    stale = run_dir / ".last.pt.tmp99999"
    stale.write_bytes(b"x" * 100)
    switokd(tmp_path, "--resume")
    assert not stale.exists()


def test_kd_refuses_a_teacher_of_another_dataset(cli, tmp_path):
    import train_kd
    import train_vanilla
    train_vanilla.main(["--dataset", "synthetic", "--train-subset", "16", "--test-subset", "8", "--batch-size", "8",
                        "--workers", "0", "--no-progress", "--epochs", "1", "--model", "wrn_10_1", "--out",
                        str(tmp_path), "--run-name", "t"])
    code, lines = cli(train_kd.main, "--dataset", "digits", "--train-subset", "16", "--test-subset", "8",
                      "--student", "wrn_10_1", "--teacher-ckpt", str(tmp_path / "vanilla" / "t"), "--out", str(tmp_path))
    assert code == 2 and len(lines) == 1 and "synthetic" in lines[0] and "digits" in lines[0], lines


# --------------------------------------------------------------------------- divergence and locks

def test_non_finite_loss_stops_with_the_iteration_named_and_keeps_last_pt(cli, tmp_path, monkeypatch):
    switokd(tmp_path, epochs=1)
    good = (tmp_path / "switokd" / "r" / "last.pt").read_bytes()
    real = train_switokd.student_loss
    calls = []

    def poisoned(*args, **kwargs):
        total, ce, kl = real(*args, **kwargs)
        calls.append(1)
        return (total * float("nan"), ce * float("nan"), kl) if len(calls) == 2 else (total, ce, kl)
    monkeypatch.setattr(train_switokd, "student_loss", poisoned)
    code, lines = cli(train_switokd.main, *TINY, "--epochs", "2", "--out", str(tmp_path), "--run-name", "r",
                      "--resume")
    errors = [line for line in lines if "error:" in line]  # besides the note that the run is extended
    assert code == 3 and len(errors) == 1 and "epoch 2, iteration 2" in errors[0] and "student_ce" in errors[0], lines
    assert (tmp_path / "switokd" / "r" / "last.pt").read_bytes() == good


def test_a_second_process_on_the_same_run_refuses(tmp_path):
    run_dir = tmp_path / "switokd" / "r"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('pid 4242 on elsewhere'); f.flush(); print('locked', flush=True); time.sleep(60)"),
        str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = subprocess.run([sys.executable, "train_switokd.py", *TINY, "--epochs", "1", "--out", str(tmp_path),
                               "--run-name", "r"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "in use by pid 4242" in lines[0], done.stderr
    finally:
        holder.kill()
        holder.wait()
    switokd(tmp_path)  # the holder is gone: its lock file alone does not block


def test_no_training_script_imports_another():
    for script in ROOT.glob("train_*.py"):
        for line in script.read_text().splitlines():
            words = line.split()
            assert not (words[:1] in (["import"], ["from"]) and len(words) > 1 and words[1].startswith("train_")), \
                f"{script.name}: {line}"

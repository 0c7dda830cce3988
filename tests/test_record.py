"""A run's record never lies at the edges (issue 21): resume, extension, divergence, TensorBoard,
the order of the files of an epoch, evaluate.py's rows, a second launcher on the same plan."""
import json
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train_dml
import train_switokd
import train_vanilla
import utils

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import launch  # noqa: E402
import summarize  # noqa: E402

TINY = ["--dataset", "synthetic", "--train-subset", "32", "--test-subset", "16", "--batch-size", "16",
        "--workers", "0", "--no-progress"]
PAIR = ["--student", "wrn_10_1", "--teacher", "wrn_10_1"]


def switokd(out, *flags, name="r"):
    return train_switokd.main([*TINY, *PAIR, "--out", str(out), "--run-name", name, *flags])



def results_of(run_dir):
    return json.loads((run_dir / "results.json").read_text())


# --------------------------------------------------------------------------- resume and extension

def test_resume_without_epochs_keeps_the_runs_own_plan(tmp_path, monkeypatch):
    """A finished 2-epoch run resumed without --epochs: nothing trains (the recipe's 300 are not the plan)."""
    switokd(tmp_path, "--epochs", "2")
    monkeypatch.setattr(utils.Run, "end_epoch", lambda self, *a, **k: pytest.fail("trained past the plan"))
    results = switokd(tmp_path, "--resume")
    assert (results["status"], results["epochs"], results["epochs_planned"]) == ("finished", 2, 2)
    monkeypatch.undo()
    assert switokd(tmp_path, "--resume", "--epochs", "2")["epochs_planned"] == 2


def test_an_extended_interrupted_run_says_so(tmp_path, interrupted_after):
    switokd(tmp_path, "--epochs", "2")
    run_dir = tmp_path / "switokd" / "r"
    with interrupted_after(3):
        switokd(tmp_path, "--epochs", "4", "--resume")
    results, rows = results_of(run_dir), [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert results["status"] != "finished" and (results["epochs"], results["epochs_planned"]) == (3, 4)
    best = max(rows, key=lambda r: r["test/student/top1"])
    assert results["networks"]["student"]["best_top1"] == best["test/student/top1"]
    assert torch.load(run_dir / "best_student.pt", weights_only=False)["epoch"] == best["epoch"]
    assert launch.status(launch.Job("", "r", "train_switokd.py", []), tmp_path) == "interrupted"  # not "finished"
    finished, unfinished, _ = summarize.read_runs(tmp_path)
    assert not finished and unfinished == [run_dir]


def test_ctrl_c_is_written_into_the_record(cli, tmp_path, monkeypatch):
    real = utils.Run.end_epoch

    def stop_after_two(self, *args, **kwargs):
        row = real(self, *args, **kwargs)
        if self.epoch == 2:
            raise KeyboardInterrupt
        return row
    monkeypatch.setattr(utils.Run, "end_epoch", stop_after_two)
    code, lines = cli(train_switokd.main, *TINY, *PAIR, "--epochs", "3", "--out", str(tmp_path),
                      "--run-name", "r")
    assert code == 130 and "last.pt keeps epoch 2" in lines[-1]
    results = results_of(tmp_path / "switokd" / "r")
    assert (results["status"], results["epochs"]) == ("interrupted", 2)
    assert "epoch 2 of 3 (interrupted)" in summarize.progress(tmp_path / "switokd" / "r")


# --------------------------------------------------------------------------- divergence

DIVERGING = ["--dataset", "digits", "--train-subset", "64", "--batch-size", "64", "--recipe", "crd", "--lr", "1e8",
             "--epochs", "4", "--workers", "0", "--no-progress"]


def test_non_finite_weights_stop_the_run_and_never_reach_last_pt(cli, tmp_path):
    """The issue's command: it used to exit 0, "finished", with NaN weights."""
    code, lines = cli(train_vanilla.main, *DIVERGING, "--model", "wrn_10_1", "--out", str(tmp_path),
                      "--run-name", "v")
    run_dir = tmp_path / "vanilla" / "v"
    assert code == 3 and len(lines) == 1 and "non-finite" in lines[0] and "epoch" in lines[0], lines
    last = run_dir / "last.pt"
    if last.exists():
        state = torch.load(last, weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["models"]["student"].values() if t.is_floating_point())
        assert f"last.pt keeps epoch {state['epoch']}" in lines[0]
    else:
        assert "no last.pt" in lines[0]
    results = results_of(run_dir)
    assert results["status"] == "diverged" and "non-finite" in results["ended"]
    _, unfinished, excluded = summarize.read_runs(tmp_path)
    assert not unfinished and [d for d, _ in excluded] == [run_dir] and "diverged" in excluded[0][1]


def test_dml_never_saves_infinite_weights(cli, tmp_path):
    code, lines = cli(train_dml.main, *DIVERGING, "--models", "wrn_10_1", "wrn_10_1", "--out", str(tmp_path),
                      "--run-name", "d")
    assert code == 3, lines
    last = tmp_path / "dml" / "d" / "last.pt"
    if last.exists():
        for weights in torch.load(last, weights_only=False)["models"].values():
            assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_a_non_finite_test_loss_stops_the_run(cli, tmp_path, monkeypatch):
    real = utils.Run.evaluate

    def poisoned(self, *args, **kwargs):
        metrics = real(self, *args, **kwargs)
        if self.epoch == 1:  # the second epoch's evaluation
            metrics["teacher"]["loss"] = float("inf")
        return metrics
    monkeypatch.setattr(utils.Run, "evaluate", poisoned)
    code, lines = cli(train_switokd.main, *TINY, *PAIR, "--epochs", "3", "--out", str(tmp_path),
                      "--run-name", "r")
    assert code == 3 and "non-finite test loss of teacher at the end of epoch 2" in lines[0]
    assert "last.pt keeps epoch 1" in lines[0]
    assert torch.load(tmp_path / "switokd" / "r" / "last.pt", weights_only=False)["epoch"] == 1


def test_a_run_killed_in_its_first_epoch_is_listed(tmp_path):
    run_dir = tmp_path / "table4" / "dml" / "x-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"epochs": 300}))
    _, unfinished, _ = summarize.read_runs(tmp_path)
    assert unfinished == [run_dir] and summarize.progress(run_dir) == "epoch 0 of 300"


# --------------------------------------------------------------------------- TensorBoard and file order

def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def comparable(points):
    """Times differ between runs: their steps must agree, their values not."""
    return {tag: [step for step, _ in pts] if tag.startswith("time/") or tag == "iter/seconds" else pts
            for tag, pts in points.items()}


@pytest.mark.parametrize("where", ["after last.pt", "between TensorBoard and last.pt"])
def test_tensorboard_after_resume_holds_an_uninterrupted_runs_points(where, tmp_path, monkeypatch, interrupted_after):
    switokd(tmp_path, "--epochs", "3", name="straight")
    if where == "after last.pt":
        with interrupted_after(2):
            switokd(tmp_path, "--epochs", "3", name="resumed")
    else:
        real = utils.save_torch

        def killed_at_epoch_two(path, obj):
            if Path(path).name == "last.pt" and obj["epoch"] == 2:
                raise KeyboardInterrupt
            real(path, obj)
        monkeypatch.setattr(utils, "save_torch", killed_at_epoch_two)
        with pytest.raises(KeyboardInterrupt):
            switokd(tmp_path, "--epochs", "3", name="resumed")
        monkeypatch.undo()
    switokd(tmp_path, "--epochs", "3", "--resume", name="resumed")
    straight, resumed = scalars(tmp_path / "switokd" / "straight"), scalars(tmp_path / "switokd" / "resumed")
    assert comparable(resumed) == comparable(straight)
    assert len(straight["iter/student_ce"]) == 3 * 2 and straight["test/student/top1"][-1][0] == 6


def test_a_best_checkpoint_is_never_newer_than_last_pt(tmp_path, monkeypatch):
    real = utils.save_torch
    switokd(tmp_path, "--epochs", "1")
    run_dir = tmp_path / "switokd" / "r"
    before = (run_dir / "best_student.pt").read_bytes()

    def killed_before_last(path, obj):
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt
        real(path, obj)
    monkeypatch.setattr(utils, "save_torch", killed_before_last)
    monkeypatch.setattr(utils.Run, "_check_finite", lambda *a: None)
    real_evaluate = utils.Run.evaluate
    monkeypatch.setattr(utils.Run, "evaluate", lambda self: {k: {**v, "top1": 101.0}  # every epoch a new best
                                                             for k, v in real_evaluate(self).items()})
    with pytest.raises(KeyboardInterrupt):
        switokd(tmp_path, "--epochs", "2", "--resume")
    assert (run_dir / "best_student.pt").read_bytes() == before  # epoch 2 never reached last.pt
    monkeypatch.setattr(utils, "save_torch", real)
    results = switokd(tmp_path, "--epochs", "2", "--resume")
    assert torch.load(run_dir / "best_student.pt", weights_only=False)["epoch"] == 2 == results["epochs"]
    assert not list(run_dir.glob(".best_*"))


# --------------------------------------------------------------------------- evaluate.py and the launcher

def test_evaluate_gives_each_file_its_own_row(tmp_path, capsys):
    train_vanilla.main([*TINY, "--model", "wrn_10_1", "--epochs", "1", "--out", str(tmp_path), "--run-name", "a"])
    train_vanilla.main([*TINY, "--model", "wrn_10_2", "--epochs", "2", "--out", str(tmp_path), "--run-name", "b"])
    a, b = (tmp_path / "vanilla" / name for name in "ab")
    report = evaluate.main([str(a / "best_student.pt"), str(b / "best_student.pt"), "--json"])
    rows = report["networks"]
    assert list(rows) == ["a:student", "b:student"] and rows["b:student"]["arch"] == "wrn_10_2"
    for name, run_dir in (("a:student", a), ("b:student", b)):
        assert rows[name]["top1"] == pytest.approx(results_of(run_dir)["networks"]["student"]["best_top1"], abs=0.01)
    both = evaluate.main([str(a), str(b), "--json"])
    assert list(both["networks"]) == ["a:student", "b:student"] and "ensemble" in both
    capsys.readouterr()
    evaluate.main([str(a), "--dataset", "digits"])
    assert "warning: evaluating on digits networks trained on synthetic" in capsys.readouterr().err


def test_evaluate_an_image_folder_of_some_digits(tmp_path):
    """Folders named by class index, a subset of the classes: digits has no class names."""
    from PIL import Image
    train_vanilla.main(["--dataset", "digits", "--train-subset", "32", "--test-subset", "16", "--batch-size", "16",
                        "--workers", "0", "--no-progress", "--model", "wrn_10_1", "--epochs", "1",
                        "--out", str(tmp_path), "--run-name", "d"])
    for digit in (3, 7):
        (tmp_path / "images" / str(digit)).mkdir(parents=True)
        Image.new("L", (8, 8), 40 * digit).save(tmp_path / "images" / str(digit) / "a.png")
    report = evaluate.main([str(tmp_path / "vanilla" / "d"), "--image-folder", str(tmp_path / "images"),
                            "--workers", "0", "--json"])
    assert report["images"] == 2 and 0 <= report["networks"]["student"]["top1"] <= 100


def test_a_second_launcher_waits_for_a_run_another_process_holds(tmp_path, capsys):
    job = launch.Job("exp", "r", "train_vanilla.py", [])
    run_dir = job.run_dir(tmp_path)
    holder = utils.RunDirectory(run_dir)
    holder.create_and_lock()
    pending, waiting = [job], set()
    assert launch.next_job(pending, argparse_out(tmp_path), waiting) is None and pending == [job]
    assert "wait  exp/vanilla/r: in use by pid" in capsys.readouterr().out
    (run_dir / "results.json").write_text(json.dumps({"status": "finished"}))
    holder.release()
    assert launch.next_job(pending, argparse_out(tmp_path), waiting) is None and pending == []
    assert "done  exp/vanilla/r (by another process)" in capsys.readouterr().out


def argparse_out(out):
    return type("Options", (), {"out": out})()

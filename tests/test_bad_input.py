"""Bad input, every script: one line on stderr naming what is wrong, a non-zero exit, nothing left behind.

One table: (script, flags, expected exit status, words the line must hold). The training scripts,
evaluate.py, launch.py, summarize.py and the figure scripts run in-process (their ``main`` under
``utils.main_guard`` where they use it), the experiment scripts through bash; every case ends
before anything trains, so the table stays fast.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import models
import train_dml
import train_kd
import train_kdcl
import train_multi
import train_okddip
import train_one
import train_switokd
import train_vanilla

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import launch  # noqa: E402
import plot_fig4  # noqa: E402
import summarize  # noqa: E402

DATA = ["--dataset", "synthetic", "--train-subset", "16", "--test-subset", "8", "--batch-size", "8", "--workers", "0",
        "--no-progress", "--epochs", "1", "--device", "cpu"]
SCRIPTS = {  # module, the flags that make a valid run
    "train_vanilla": (train_vanilla, ["--model", "wrn_10_1"]),
    "train_switokd": (train_switokd, ["--student", "wrn_10_1", "--teacher", "wrn_10_1"]),
    "train_multi": (train_multi, ["--teachers", "wrn_10_1", "--students", "wrn_10_1", "wrn_10_1"]),
    "train_kd": (train_kd, ["--student", "wrn_10_1", "--teacher-ckpt", "{teacher}"]),
    "train_dml": (train_dml, ["--models", "wrn_10_1", "wrn_10_1"]),
    "train_kdcl": (train_kdcl, ["--models", "wrn_10_1", "wrn_10_1"]),
    "train_okddip": (train_okddip, ["--backbone", "resnet32", "--branches", "2"]),
    "train_one": (train_one, ["--backbone", "resnet32", "--branches", "2"]),
}
COMMON = [  # (flags, words): every training script
    (["--seed", "4294967296"], "--seed"), (["--seed", "-1"], "--seed"), (["--seed", "1.5"], "--seed"),
    (["--device", "meta"], "'meta'"), (["--device", "tpu"], "'tpu'"), (["--device", "cuda:0"], "CUDA is not available"),
    (["--epochs", "0"], "--epochs"), (["--epochs"], "--epochs"), (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "many"], "many"), (["--recipe", "fast"], "fast"),
    (["--dataset", "imagenet1k"], "imagenet1k"), (["--run-name", "../../x"], "--run-name"),
    (["--run-name", "."], "--run-name"), (["--resume", "--run-name", "nothing-here"], "no run to continue"),
    (["--sync-bn"], "--sync-bn"), (["--amp", "fp8"], "fp8"), (["--loader", "fast"], "fast"),
    (["--train-subset", "0"], "--train-subset"), (["--log-interval", "0"], "--log-interval"),
    (["--workers", "-1"], "--workers"), (["--bogus"], "--bogus"), (["--compile", "magic"], "magic"),
    (["--arch-variant", "best"], "best"), (["--lr-drop", "never"], "never"),
    (["--dataset", "mnist", "--data-root", "/nonexistent"], "--download"),
]
SPECIFIC = [  # (script, flags, words)
    ("train_switokd", ["--no-switching", "--fixed-delta", "0.5"], "exclude each other"),
    ("train_switokd", ["--fixed-delta", "3"], "--fixed-delta"),
    ("train_switokd", ["--fixed-delta", "-1"], "--fixed-delta"),
    ("train_switokd", ["--switch-rule", "paper"], "paper"), ("train_switokd", ["--r-form", "product"], "product"),
    ("train_switokd", ["--tau", "0"], "--tau"), ("train_switokd", ["--alpha", "-1"], "--alpha"),
    ("train_switokd", ["--teacher-loss", "mean"], "mean"), ("train_switokd", ["--student", "resnet21"], "resnet21"),
    ("train_switokd", ["--teacher", "wrn_15_2"], "wrn_15_2"),
    ("train_multi", ["--no-switching", "--fixed-delta", "0.5"], "exclude each other"),
    ("train_multi", ["--topology", "3T3S"], "3T3S"), ("train_multi", ["--paused-teacher", "sleep"], "sleep"),
    ("train_multi", ["--teachers", "wrn_10_1", "wrn_10_1", "--pair-epsilon", "other-pair"], "two teacher-student"),
    ("train_vanilla", ["--keep-epochs", "5"], "beyond"),
    ("train_vanilla", ["--keep-route", "0"], "--keep-route"), ("train_vanilla", ["--role", "peer"], "peer"),
    ("train_vanilla", ["--model", "resnet21"], "resnet21"),
    ("train_vanilla", ["--keep-route", "2", "--keep-epochs", "1"], "not allowed with"),
    ("train_kd", ["--teacher-ckpt", "/nonexistent/run"], "no checkpoint"), ("train_kd", ["--distill", "dkd"], "dkd"),
    ("train_kd", ["--alpha", "2"], "--alpha"), ("train_kd", ["--at-p", "3"], "--at-p applies to"),
    ("train_kd", ["--kd-form", "okddip", "--alpha", "0.5"], "--alpha"), ("train_kd", ["--nce-k", "0"], "--nce-k"),
    ("train_kd", ["--distill", "fitnet", "--hint-layer", "9"], "--hint-layer 9"),
    ("train_kd", ["--distill", "rco"], "route"), ("train_kd", ["--teacher-ckpt", "{multi}"], "multi-branch"),
    ("train_kd", ["--tau", "0"], "--tau"),
    ("train_dml", ["--models", "wrn_10_1"], "two or more"), ("train_dml", ["--roles", "a"], "--roles"),
    ("train_dml", ["--roles", "a", "a"], "distinct"), ("train_dml", ["--roles", "1x", "b"], "bad role name"),
    ("train_dml", ["--tau", "0"], "--tau"), ("train_dml", ["--peer-target", "all"], "all"),
    ("train_dml", ["--kl", "js"], "js"),
    ("train_kdcl", ["--ensemble", "max"], "max"), ("train_kdcl", ["--lam", "-1"], "--lam"),
    ("train_kdcl", ["--tau", "0"], "--tau"), ("train_kdcl", ["--models", "wrn_10_1", "x"], "'x'"),
    ("train_kdcl", ["--ensemble", "general", "--holdout", "16"], "holdout"),
    ("train_okddip", ["--backbone", "vgg19"], "vgg19"), ("train_okddip", ["--branches", "1"], "--branches"),
    ("train_okddip", ["--shared-dense-block"], "densenet40_12"),
    ("train_okddip", ["--ramp-length", "-1"], "--ramp-length"),
    ("train_okddip", ["--tau", "0"], "--tau"),
    ("train_one", ["--method", "two"], "two"), ("train_one", ["--branches", "1"], "--branches"),
    ("train_one", ["--shared-dense-block"], "densenet40_12"),
]
CASES = [(script, flags, 2, words) for script in SCRIPTS for flags, words in COMMON] + \
        [(script, flags, 2, words) for script, flags, words in SPECIFIC]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny vanilla teacher run and a multi-branch (OKDDip) run directory."""
    root = tmp_path_factory.mktemp("bad-input-checkpoints")
    train_vanilla.main([*DATA, "--model", "wrn_10_1", "--role", "teacher", "--out", str(root), "--run-name", "t"])
    multi = root / "okddip" / "m"
    multi.mkdir(parents=True)
    net = models.build("okddip:resnet32@2", 10)
    torch.save({"arch": "okddip:resnet32@2", "variant": "paper", "num_classes": 10, "image_size": 32,
                "dataset": "synthetic", "role": "net", "epoch": 1, "model": net.state_dict()}, multi / "best_net.pt")
    return {"teacher": str(root / "vanilla" / "t"), "multi": str(multi)}


@pytest.mark.parametrize("script,flags,code,words", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_training_scripts(script, flags, code, words, tmp_path, cli, checkpoints):
    module, valid = SCRIPTS[script]
    argv = [a.format(**checkpoints) for a in [*DATA, *valid, *flags]] + ["--out", str(tmp_path / "out")]
    status, lines = cli(module.main, *argv)
    assert status == code and len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


@pytest.fixture
def runs(tmp_path):
    """A run root with a finished tiny run and a run whose results.json is damaged."""
    train_vanilla.main([*DATA, "--model", "wrn_10_1", "--out", str(tmp_path), "--run-name", "ok"])
    damaged = tmp_path / "vanilla" / "damaged"
    damaged.mkdir()
    for name in ("best_student.pt", "last.pt"):
        (damaged / name).write_bytes((tmp_path / "vanilla" / "ok" / name).read_bytes())
    (damaged / "results.json").write_text("{not json")
    return tmp_path


EVALUATE = [
    (["{root}/nothing"], "no checkpoint"), (["{root}/vanilla/damaged"], "cannot read"),
    (["{root}/vanilla/ok", "--weights", "median"], "median"), (["{root}/vanilla/ok", "--dataset", "svhn"], "svhn"),
    (["{root}/vanilla/ok", "--batch-size", "0"], "--batch-size"), (["{root}/vanilla/ok", "--device", "meta"], "meta"),
    (["{root}/vanilla/ok", "--image-folder", "{root}/no-images"], "image folder"), (["{root}/vanilla"], "no best_"),
    (["{root}/vanilla/ok", "--amp", "fp8"], "fp8"), (["{root}/vanilla/ok", "--test-subset", "-3"], "--test-subset"),
]


@pytest.mark.parametrize("flags,words", EVALUATE, ids=[" ".join(f) for f, _ in EVALUATE])
def test_evaluate(flags, words, runs, cli):
    status, lines = cli(evaluate.main, *[f.format(root=runs) for f in flags])
    assert status == 2 and len(lines) == 1 and words in lines[0], lines


def test_evaluate_names_a_corrupt_image(runs, cli):
    folder = runs / "images"
    (folder / "3").mkdir(parents=True)  # one class of the ten, named by its index
    (folder / "3" / "a.png").write_bytes(b"\x89PNG not really")
    status, lines = cli(evaluate.main, *[str(runs / "vanilla" / "ok"), "--image-folder", str(folder),
                                                     "--workers", "0"])
    assert status == 2 and len(lines) == 1 and "cannot read image" in lines[0] and "a.png" in lines[0], lines


PLAN_LINES = [
    ("run exp name train_nothing.py --seed 0", "unknown training script"), ("walk exp", "expected 'run"),
    ("run exp 'unbalanced train_vanilla.py", "No closing quotation"), ("run exp", "expected 'run"),
]


@pytest.mark.parametrize("line,words", PLAN_LINES)
def test_launcher_plans(line, words, tmp_path, capsys):
    plan = tmp_path / "plan"
    plan.write_text(line + "\n")
    assert launch.main([str(plan), "--out", str(tmp_path), "--dry-run"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and words in lines[0], lines


LAUNCH_FLAGS = [(["--gpus-per-run", "0"], "--gpus-per-run"), (["--epochs", "0"], "--epochs"),
                (["--partition", "gpu"], "need --slurm"), (["--time", "forever", "--slurm"], "forever"),
                (["--bogus"], "--bogus")]


@pytest.mark.parametrize("flags,words", LAUNCH_FLAGS)
def test_launcher_flags(flags, words, tmp_path, capsys):
    plan = tmp_path / "plan"
    plan.write_text("")
    with pytest.raises(SystemExit) as stop:
        launch.main([str(plan), *flags])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert stop.value.code == 2 and len(lines) == 1 and words in lines[-1], lines


def test_launcher_missing_plan(tmp_path, capsys):
    assert launch.main([str(tmp_path / "no-plan"), "--dry-run"]) == 2
    assert "no-plan" in capsys.readouterr().err


@pytest.mark.parametrize("flags,words", [(["{root}/missing"], "no folder"),
                                         (["{root}", "--published", "{root}/missing.json"], "missing.json")])
def test_summarize(flags, words, tmp_path, capsys):
    assert summarize.main([f.format(root=tmp_path) for f in flags]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and words in lines[0], lines


def test_plot_fig4_without_a_trace(runs):
    with pytest.raises(SystemExit, match="no switching.npz"):
        plot_fig4.main([str(runs / "vanilla" / "ok")])


SHELL = [
    (["--seeds", "x"], "seeds must be integers"), (["--ngpus", "0"], "--ngpus"), (["--epochs", "many"], "--epochs"),
    (["--gpus-per-run", "0"], "--gpus-per-run"), (["--frobnicate"], "unknown option"), (["--out"], "needs a value"),
    (["--partition", "gpu"], "needs --slurm"), (["--slurm", "--gpus", "0"], "--gpus-per-run"),
]


@pytest.mark.parametrize("flags,words", SHELL)
@pytest.mark.parametrize("script", ["table4_comparison.sh", "cpu_study.sh"])
def test_experiment_scripts(script, flags, words):
    done = subprocess.run(["bash", str(REPO / "scripts" / script), *flags, "--dry-run"], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == 2 and len(lines) == 1 and words in lines[0], lines


def test_the_table_is_large():
    total = len(CASES) + len(EVALUATE) + 1 + len(PLAN_LINES) + len(LAUNCH_FLAGS) + 1 + 2 + 1 + 2 * len(SHELL)
    assert total >= 150 and len(SCRIPTS) == 8  # every training script, and the other tools

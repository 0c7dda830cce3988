"""What a newcomer meets (issue 22): names, resume errors, threads, help texts, the console, pipes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_dml
import train_kd
import train_multi
import train_switokd
import train_vanilla
import utils

REPO = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--train-subset", "32", "--test-subset", "16", "--batch-size", "16",
        "--workers", "0"]



def test_kd_run_names_say_which_teacher():
    names = {utils.default_run_name(train_kd.parse_args(["--teacher-ckpt", path, "--student", "resnet20"]),
                                    {"student": "resnet20", "teacher": train_kd.teacher_label(path)})
             for path in ("runs/vanilla/t1", "runs/vanilla/t2", "runs/vanilla/t1/last.pt")}
    assert len(names) == 3 and any("-t2-" in n for n in names) and any("t1.last" in n for n in names)


def test_resume_with_its_flags_left_out_names_them_before_any_data_loads(cli, tmp_path):
    train_switokd.main([*TINY, "--student", "wrn_10_1", "--teacher", "wrn_10_1", "--epochs", "1", "--no-progress",
                        "--out", str(tmp_path), "--run-name", "r"])
    code, lines = cli(train_switokd.main, "--resume", "--out", str(tmp_path), "--run-name", "r",
                      "--data-root", str(tmp_path / "no-data"))  # the defaults: CIFAR-100, which is not there
    assert code == 2 and len(lines) == 1 and "--dataset synthetic -> cifar100" in lines[0], lines
    assert "--student wrn_10_1 -> mobilenetv2_0.5" in lines[0] and "args.json" in lines[0]


def test_a_misspelt_network_is_named_before_any_data_loads(cli, tmp_path):
    code, lines = cli(train_vanilla.main, "--model", "resnt20", "--dataset", "cifar100", "--data-root",
                      str(tmp_path / "no-data"), "--out", str(tmp_path))
    assert code == 2 and "unknown model 'resnt20'" in lines[0] and not (tmp_path / "no-data").exists()


def test_threads_default_is_printed_and_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert utils.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert utils.default_threads() == len(os.sched_getaffinity(0))
    results = train_vanilla.main([*TINY, "--model", "wrn_10_1", "--epochs", "1", "--threads", "1", "--out",
                                  str(tmp_path), "--no-progress"])
    assert results["settings"]["threads"] == 1 and "1 CPU thread," in capsys.readouterr().out


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        train_dml.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: True)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        train_switokd.parse_args(["--help"])
    run_name = capsys.readouterr().out.split("--run-name RUN_NAME", 1)[1].split("--resume")[0]
    assert "-tau=2.0-official-seed0" in " ".join(run_name.split()).replace("- ", "-")


def test_the_multi_epoch_line_names_each_pair(tmp_path, capsys):
    train_multi.main([*TINY, "--teachers", "wrn_10_1", "--students", "wrn_10_1", "wrn_10_1", "--epochs", "1",
                      "--no-progress", "--out", str(tmp_path)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1/1"))
    assert "teacher1-student1 expert_fraction" in line and "teacher1-student2 expert_fraction" in line


def test_synthetic_size_and_classes_from_the_command_line(tmp_path):
    results = train_vanilla.main([*TINY, "--synthetic", "num_classes=4", "train_size=100", "--model", "wrn_10_1",
                                  "--epochs", "1", "--no-progress", "--out", str(tmp_path)])
    assert results["args"]["synthetic"] == ["num_classes=4", "train_size=100"]
    run_dir = next((tmp_path / "vanilla").iterdir())
    assert "synthetic=num_classes=4_train_size=100" in run_dir.name
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


def test_a_short_epoch_prints_no_progress_lines(tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "train_vanilla.py", *TINY, "--model", "wrn_10_1", "--epochs", "1",
                               "--out", str(tmp_path)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0 and " iter " not in text and "epoch 1/1  test" in text, text[-2000:]


def test_a_closed_pipe_is_not_an_error():
    done = subprocess.run("bash scripts/table4_comparison.sh --dry-run | head -1", shell=True, cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0 and "Traceback" not in done.stderr and done.stdout.startswith("python ")


def test_slurm_jobs_ask_for_cpus(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import launch
    import slurm_backend
    opts = launch.parse_args([str(tmp_path / "plan"), "--slurm", "--gpus-per-run", "2", "--partition", "gpu"])
    job = launch.Job("table4", "x", "train_vanilla.py", [])
    assert slurm_backend.parameters(opts, [job])["cpus_per_task"] == 16
    opts = launch.parse_args([str(tmp_path / "plan"), "--slurm", "--sbatch=--cpus-per-task=3"])
    assert "cpus_per_task" not in slurm_backend.parameters(opts, [job])


def test_the_repository_cites_only_what_it_contains():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    for name in tracked:
        if name.endswith((".py", ".md", ".sh", ".json")) and name != "tests/test_newcomer.py":
            text = (REPO / name).read_text()
            assert "shared/reference" not in text and "code-facts" not in text, name

"""The experiment scripts (scripts/): every one end to end in smoke mode, the launcher's
skip/resume/parallel/dry-run logic, summarize.py's statistics and published numbers, and
the figure scripts on a real short run."""
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import launch  # noqa: E402
import summarize  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bash(script, *args, env=None, **kwargs):
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, **kwargs)


# --------------------------------------------------------------------------- smoke_all

@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """scripts/smoke_all.sh once: every experiment script, summarize.py and every figure script."""
    out = tmp_path_factory.mktemp("smoke")
    done = subprocess.run(["bash", str(SCRIPTS / "smoke_all.sh"), str(out)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_smoke_all_runs_every_script_to_the_end(smoke):
    plan = (smoke / "smoke-plan.txt").read_text()
    runs = [line for line in plan.splitlines() if line.startswith("run ")]
    experiments = {line.split()[1] for line in runs}
    assert experiments == {"table2", "table3", "table4", "table5", "table6", "table7", "fig1", "fig4", "fig5", "fig7",
                           "okddip_cifar", "cpu_study"}
    finished = list(smoke.rglob("results.json"))
    # table6 lists ResNet-18 alone in both of its pairs; fig6 lists 5 runs of table6 again
    assert len(runs) == 116 and len(finished) == len(set(runs)) == 110  # cpu_study: 6 runs of one seed
    assert not [p for p in smoke.rglob("last.pt") if not (p.parent / "results.json").is_file()]
    summary = (smoke / "summary.md").read_text()
    for title in ("Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Table 7", "Fig. 4", "Fig. 1", "Fig. 5",
                  "Fig. 7", "OKDDip", "CPU study"):
        assert f"## {title}" in summary
    assert "In progress" not in summary and "No run matches a cell" in summary  # digits runs: in no paper cell
    every = io.StringIO()
    with redirect_stdout(every):
        summarize.main([str(smoke), "--all"])
    assert "paper 73.47" in every.getvalue()
    rows = list(csv.DictReader(io.StringIO((smoke / "summary.csv").read_text())))
    assert sum(r["row"].startswith("switokd") for r in rows) > 0  # smoke runs (digits) are in no paper cell


def test_smoke_runs_are_tiny_and_mapped(smoke):
    results = json.loads(next((smoke / "table7" / "switokd_multi").glob("cifar100-1T2S-seed0/results.json"))
                         .read_text())
    assert results["dataset"] == "digits" and results["epochs"] == 1
    assert {n["arch"] for n in results["networks"].values()} <= {"wrn_10_1", "wrn_10_2", "wrn_10_3"}
    assert results["topology"] == "1T2S"


def test_figures_are_png_files(smoke):
    for name in ("fig4.png", "fig4e.png", "fig5.png", "fig7.png"):
        data = (smoke / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name


def test_fig6_draws_and_scores_every_method(smoke):
    """scripts/fig6_gradcam.sh --smoke: Grad-CAM of the Table 6 pair, SwitOKD against DML, KDCL, Vanilla."""
    data = (smoke / "fig6" / "fig6.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 50_000
    report = json.loads((smoke / "fig6" / "fig6.json").read_text())
    assert list(report["methods"]) == ["SwitOKD", "DML", "KDCL", "Vanilla"] and report["dataset"] == "digits"
    assert len(report["images"]) == len(set(report["images"])) == len(report["labels"]) == 8
    for method, entry in report["methods"].items():
        assert entry["teacher"]["arch"] == entry["student"]["arch"] == "wrn_10_3"  # resnet34, resnet18 in smoke
        assert entry["teacher"]["layer"] == "features.5" and len(entry["correlation"]) == len(entry["iou"]) == 8
        assert "imagenet-resnet" in entry["teacher"]["run"] and "table6" in entry["student"]["run"]
        scored = [v for v in entry["correlation"] if v is not None]
        assert entry["scored"] == len(scored) and (entry["mean_correlation"] is None) == (not scored)
        if scored:
            assert entry["mean_correlation"] == pytest.approx(sum(scored) / len(scored))
    assert report["methods"]["Vanilla"]["student"]["run"].endswith("vanilla/imagenet-resnet18-seed0")


def test_fig6_lists_the_table6_runs_it_reads(tmp_path):
    """fig6_gradcam.sh trains nothing of its own: its runs are Table 6's, with the same flags."""
    plans = {}
    for script in ("table6_imagenet", "fig6_gradcam"):
        plans[script] = tmp_path / script
        assert bash(f"{script}.sh", env={"PLAN_SINK": str(plans[script])}).returncode == 0
    table6, fig6 = (set(plans[s].read_text().splitlines()) for s in ("table6_imagenet", "fig6_gradcam"))
    assert len(fig6) == 5 and fig6 <= table6


def test_plot_fig4_needs_a_switokd_run(smoke, tmp_path):
    import plot_fig4
    with pytest.raises(SystemExit, match="switching.npz"):
        plot_fig4.main([str(next((smoke / "fig4" / "kdcl").iterdir())), "--output", str(tmp_path / "x.png")])


# --------------------------------------------------------------------------- launcher

def test_dry_run_prints_commands_and_runs_nothing(tmp_path):
    done = bash("table5_offline_kd.sh", "--dry-run", "--out", str(tmp_path / "runs"), "--gpus", "0 1",
                "--seeds", "0 1", "--data-root", "/data", "--", "--amp")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 16 and "# --- wait for the runs above" in lines
    assert lines.index("# --- wait for the runs above") == 6  # the offline methods after their teachers
    assert all(c.startswith(("CUDA_VISIBLE_DEVICES=0 python ", "CUDA_VISIBLE_DEVICES=1 python ")) for c in commands)
    assert all("--data-root /data" in c and c.count("--amp") == 1 for c in commands)
    assert sum("--keep-route 4" in c for c in commands) == 2   # the teachers keep their route (RCO's anchors)
    offline = [c for c in commands if "train_kd.py" in c]
    assert [c.split("--distill ")[1].split()[0] for c in offline] == ["kd", "fitnet", "at", "crd", "rco"] * 2
    kd = [c for c in offline if "--distill kd" in c]
    assert kd[1].endswith("--run-name cifar100-wrn_16_2-wrn_40_2-seed1")
    assert f"--teacher-ckpt {tmp_path}/runs/table5/vanilla/cifar100-wrn_40_2-seed1" in kd[1]
    assert not (tmp_path / "runs").exists()


def test_dry_run_skips_finished_and_resumes_interrupted(tmp_path):
    root = tmp_path / "runs" / "table2" / "switokd"
    (root / "cifar100-resnet32-wrn_16_2-A-no-switching-seed0").mkdir(parents=True)
    (root / "cifar100-resnet32-wrn_16_2-A-no-switching-seed0" / "results.json").write_text('{"status": "finished"}')
    (root / "cifar100-resnet32-wrn_16_2-D-switokd-seed0").mkdir()
    (root / "cifar100-resnet32-wrn_16_2-D-switokd-seed0" / "last.pt").write_bytes(b"")
    done = bash("table2_ablation.sh", "--dry-run", "--seeds", "0", env={"OUT": str(tmp_path / "runs"), "GPUS": ""})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"# finished, skipped: {root}/cifar100-resnet32-wrn_16_2-A-no-switching-seed0"
    assert len(lines) == 6
    assert lines[-1].endswith("--run-name cifar100-resnet32-wrn_16_2-D-switokd-seed0 --resume")
    assert sum("--resume" in line for line in lines) == 1
    assert all("--no-switching" not in line for line in lines[1:])


def test_smoke_dry_run_maps_everything_small(tmp_path):
    done = bash("table6_imagenet.sh", "--dry-run", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        assert "--dataset digits" in line and "imagenet" not in line.split("--run-name")[0]
        assert "resnet" not in line.split("--run-name")[0] and "--device cpu" in line and "--seed 0" in line
    assert len(done.stdout.splitlines()) == 9


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--seeds", "a b"], "seeds must be integers"),
    (["--ngpus", "0"], "--ngpus must be a positive integer"),
    (["--epochs"], "--epochs needs a value"),
])
def test_bad_options_fail_with_one_line(args, message):
    done = bash("table3_temperature.sh", *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1


FAKE_TRAINER = """
import json, os, sys, time
from pathlib import Path
argv = sys.argv[2:]
value = lambda flag: argv[argv.index(flag) + 1]
run = Path(value("--out")) / {"train_vanilla.py": "vanilla"}[Path(sys.argv[1]).name] / value("--run-name")
run.mkdir(parents=True, exist_ok=True)
start = time.time()
time.sleep(0.4)
with open(Path(os.environ["FAKE_LOG"]), "a") as f:
    f.write(json.dumps({"name": value("--run-name"), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                        "resume": "--resume" in argv, "start": start, "end": time.time()}) + "\\n")
if "bad" in value("--run-name"):
    sys.exit(3)
(run / "results.json").write_text(json.dumps({"status": "finished"}))
"""


def test_launcher_runs_one_per_gpu_skips_finished_and_reports_failures(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINER)
    monkeypatch.setattr(launch, "launcher", lambda slot: [sys.executable, str(fake)])
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    plan = tmp_path / "plan"
    plan.write_text("".join(f"run exp {name}-seed0 train_vanilla.py --model wrn_16_1 --seed 0\n"
                            for name in ("a", "b", "c", "bad")) + "barrier\nrun exp d-seed0 train_vanilla.py\n")
    (tmp_path / "out" / "exp" / "vanilla" / "c-seed0").mkdir(parents=True)
    (tmp_path / "out" / "exp" / "vanilla" / "c-seed0" / "last.pt").write_bytes(b"")

    assert launch.main([str(plan), "--out", str(tmp_path / "out"), "--gpus", "0 1"]) == 1
    calls = {c["name"]: c for c in map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())}
    assert set(calls) == {"a-seed0", "b-seed0", "c-seed0", "bad-seed0", "d-seed0"}
    assert {c["gpu"] for c in calls.values()} == {"0", "1"}
    assert calls["a-seed0"]["start"] < calls["b-seed0"]["end"] and calls["b-seed0"]["start"] < calls["a-seed0"]["end"]
    assert calls["d-seed0"]["start"] >= max(c["end"] for n, c in calls.items() if n != "d-seed0")  # barrier
    assert [n for n, c in calls.items() if c["resume"]] == ["c-seed0"]
    assert "bad-seed0" in capsys.readouterr().err
    log = tmp_path / "out" / "exp" / "logs" / "vanilla-a-seed0.log"
    assert "--run-name a-seed0" in log.read_text()

    (tmp_path / "calls.jsonl").unlink()
    assert launch.main([str(plan), "--out", str(tmp_path / "out"), "--gpus", "0 1"]) == 1  # only 'bad' again
    assert [json.loads(c)["name"] for c in (tmp_path / "calls.jsonl").read_text().splitlines()] == ["bad-seed0"]


def test_launcher_rejects_a_bad_plan(tmp_path, capsys):
    plan = tmp_path / "plan"
    plan.write_text("run exp a train_nothing.py --x\n")
    assert launch.main([str(plan)]) == 2
    assert "unknown training script 'train_nothing.py'" in capsys.readouterr().err


def test_a_run_listed_twice_runs_once():
    phases = launch.read_plan("run e a-seed0 train_vanilla.py --x 1\nbarrier\n"
                              "run e a-seed0 train_vanilla.py --x 1\nrun e b-seed0 train_vanilla.py\n")
    assert [[job.name for job in phase] for phase in phases] == [["a-seed0"], ["b-seed0"]]
    with pytest.raises(launch.PlanError, match="plan line 2: run e/vanilla/a of line 1 again, with other flags"):
        launch.read_plan("run e a train_vanilla.py --x 1\nrun e a train_vanilla.py --x 2\n")


def test_fig6_dry_run_prints_the_plot_after_the_runs(tmp_path):
    done = bash("fig6_gradcam.sh", "--dry-run", "--out", str(tmp_path), "--data-root", "/data", "--gpus", "0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 7 and lines[5] == "# then, over the finished runs:"
    assert all("--dataset imagenet" in line for line in lines[:5])
    plot = lines[6]
    assert "scripts/plot_fig6.py " in plot and plot.endswith(f"--output {tmp_path}/fig6/fig6.png")
    assert f" {tmp_path}/table6/switokd/imagenet-resnet18-resnet34-seed0 " in plot
    assert (f"--vanilla {tmp_path}/table6/vanilla/imagenet-resnet18-seed0 "
            f"{tmp_path}/table6/vanilla/imagenet-resnet34-seed0") in plot and "--data-root /data" in plot
    assert not tmp_path.joinpath("table6").exists()


def test_smoke_flags_replace_values_and_models():
    flags = launch.smoke_flags(["--dataset", "imagenet", "--models", "resnet18", "resnet34", "mobilenet",
                                "--epochs", "120", "--tau", "2"])
    assert flags[:5] == ["--dataset", "digits", "--models", "wrn_10_3", "wrn_10_3"]
    assert flags[5:7] == ["wrn_10_2", "--epochs"] and flags[7] == "1" and flags.count("--epochs") == 1
    assert flags[8:10] == ["--tau", "2"] and "--no-progress" in flags
    assert launch.make_slots(["0", "1", "2", "3", "4"], 2) == [["0", "1"], ["2", "3"]]
    assert launch.make_slots([], 1) == [None]


# --------------------------------------------------------------------------- summarize.py

def fake_run(root, experiment, method, name, seed, networks, extra=None, dataset="cifar100", finished=True,
             status="finished"):
    """A run directory with the fields of a real results.json (networks: {role: (arch, best, final)})."""
    run = root / experiment / method / f"{name}-seed{seed}"
    run.mkdir(parents=True)
    results = {"method": method, "status": status, "dataset": dataset, "recipe": "paper", "seed": seed, "epochs": 300,
               "epochs_planned": 300, "world_size": 1, "wall_time_s": 3600.0 * (seed + 1),
               "networks": {role: {"arch": arch, "params": 1, "best_top1": best, "best_epoch": 1,
                                   "final_top1": final, "final_top5": 99.0, "final_loss": 1.0}
                            for role, (arch, best, final) in networks.items()},
               **(extra or {}), "args": {"seed": seed}}
    (run / "last.pt").write_bytes(b"")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (run / "args.json").write_text(json.dumps({"epochs": 300}))
    if finished:
        time.sleep(0.01)
        (run / "results.json").write_text(json.dumps(results))
    return run


SWITOKD = {"switching": {"rule": "paper", "r_form": "sum", "fixed_delta": None, "no_switching": False, "tau": 1.0,
                         "alpha": 1.0, "beta": 1.0, "teacher_loss": "reciprocal"}, "expert_fraction": 0.3}


def summarize_csv(root, *flags):
    out = io.StringIO()
    with redirect_stdout(out):
        assert summarize.main([str(root), "--csv", *flags]) == 0
    return list(csv.DictReader(io.StringIO(out.getvalue())))


def test_summarize_means_stds_counts_and_published_values(tmp_path):
    pair = ("mobilenetv2_0.5", "wrn_16_2")

    def nets(student, teacher):
        return {"student": (pair[0], student, student - 1), "teacher": (pair[1], teacher, teacher)}

    for seed, (s, t) in enumerate([(67.0, 74.0), (68.0, 73.0), (69.5, 72.5)]):
        fake_run(tmp_path, "table4", "switokd", "cifar100-pair", seed, nets(s, t),
                 {**SWITOKD, "expert_fraction": 0.1 * seed})
    fake_run(tmp_path, "table4", "vanilla", "cifar100-mobilenetv2_0.5", 0, {"student": (pair[0], 60.0, 59.0)})
    fake_run(tmp_path, "table4", "dml", "cifar100-pair", 0, nets(66.0, 74.0))
    fake_run(tmp_path, "table4", "dml", "cifar100-pair", 1, nets(66.0, 74.0), finished=False)  # in progress
    fake_run(tmp_path, "table4", "kdcl", "cifar100-pair", 0, nets(1.0, 1.0), status="stopped")  # not yet finished
    fake_run(tmp_path, "table4", "switokd", "cifar10-pair", 0, nets(50.0, 50.0), SWITOKD,
             dataset="cifar10")  # another dataset: in no CIFAR-100 cell
    fake_run(tmp_path, "mine", "vanilla", "x", 0, {"student": ("resnet20", 10.0, 9.0)})

    rows = summarize_csv(tmp_path)
    cells = {(r["table"], r["row"], r["column"]): r for r in rows}
    student = cells[("table4", "CIFAR-100 student 0.5MobileNetV2", "SwitOKD")]
    assert student["n"] == "3" and student["seeds"] == "0 1 2"
    assert float(student["best_mean"]) == pytest.approx(68.1667, abs=1e-4)
    assert float(student["best_std"]) == pytest.approx(1.2583, abs=1e-4)  # sample std, ddof 1
    assert float(student["final_mean"]) == pytest.approx(67.1667, abs=1e-4)
    assert float(student["paper"]) == 67.24 and float(student["paper_std"]) == 0.04
    assert float(student["best_minus_paper"]) == pytest.approx(68.1667 - 67.24, abs=1e-4)
    teacher = cells[("table4", "CIFAR-100 teacher WRN-16-2", "SwitOKD")]
    assert float(teacher["best_mean"]) == pytest.approx(73.1667, abs=1e-4) and float(teacher["paper"]) == 73.90
    vanilla = cells[("table4", "CIFAR-100 student 0.5MobileNetV2", "Vanilla")]
    assert vanilla["n"] == "1" and vanilla["best_std"] == "" and float(vanilla["paper"]) == 60.07
    assert ("table4", "CIFAR-100 teacher WRN-16-2", "Vanilla") not in cells  # no vanilla teacher run: no row
    dml = cells[("table4", "CIFAR-100 student 0.5MobileNetV2", "DML")]
    assert dml["n"] == "1" and float(dml["best_mean"]) == 66.0 and float(dml["final_mean"]) == 65.0
    assert ("table4", "CIFAR-100 student 0.5MobileNetV2", "KDCL") not in cells
    every = {(r["table"], r["row"], r["column"]): r for r in summarize_csv(tmp_path, "--all")}
    assert every[("table4", "Tiny-ImageNet student 1.4MobileNetV2", "SwitOKD")]["n"] == "0"
    assert float(every[("table4", "Tiny-ImageNet student 1.4MobileNetV2", "SwitOKD")]["paper"]) == 58.71
    progress = sorted(r["runs"] for r in rows if r["row"] == "in progress")
    assert progress == ["table4/dml/cifar100-pair-seed1", "table4/kdcl/cifar100-pair-seed0"]
    others = {(r["table"], r["row"], r["column"]): r for r in rows if r["row"].startswith(("switokd", "vanilla"))}
    assert others[("table4", "switokd cifar10-pair", "student")]["best_mean"] == "50.0000"
    assert others[("mine", "vanilla x", "student")]["n"] == "1"

    out = io.StringIO()
    with redirect_stdout(out):
        summarize.main([str(tmp_path)])
    text = out.getvalue()
    assert "68.17 ± 1.26 / 67.17 ± 1.26 (n=3) · paper 67.24 ± 0.04 (+0.93)" in text
    assert "60.00 ± – / 59.00 ± – (n=1) · paper 60.07 ± 0.40 (-0.07)" in text
    assert "- table4/dml/cifar100-pair-seed1: epoch 2 of 300" in text
    assert "## Experiment 'mine'" in text and "sample std (ddof 1)" in text


def test_summarize_table_specific_matching(tmp_path):
    ablation = [({"no_switching": True}, 72.0), ({"fixed_delta": 0.6}, 71.0), ({"teacher_loss": "independent"}, 70.0),
                ({}, 73.0)]
    for i, (change, best) in enumerate(ablation):
        extra = {**SWITOKD, "switching": {**SWITOKD["switching"], **change}}
        fake_run(tmp_path, "table2", "switokd", f"case{i}", 0, {"student": ("resnet32", best, best),
                                                              "teacher": ("wrn_16_2", 75.0, 75.0)}, extra)
    for topology, roles in (("1T2S", {"student1": "wrn_16_2", "student2": "mobilenet", "teacher1": "wrn_16_10"}),
                            ("2T1S", {"student1": "mobilenet", "teacher1": "wrn_16_10", "teacher2": "wrn_16_2"})):
        fake_run(tmp_path, "table7", "switokd_multi", topology, 0,
                 {role: (arch, 60.0 + len(arch) + (topology == "2T1S"), 0.0) for role, arch in roles.items()},
                 {"topology": topology})
    fake_run(tmp_path, "table7", "vanilla", "wrn_16_2", 0, {"student": ("wrn_16_2", 73.0, 73.0)})
    fake_run(tmp_path, "table5", "kd", "kd", 0, {"student": ("wrn_16_2", 74.0, 74.0)},
             {"kd": {"alpha": 0.1, "tau": 3.0}, "teacher": {"arch": "wrn_40_2", "checkpoint": "x", "params": 2}})
    fake_run(tmp_path, "fig7", "dml", "t", 0, {"student": ("mobilenetv2", 1.0, 1.0), "teacher": ("resnet18", 2.0, 2.0)},
             dataset="tinyimagenet")
    for seed in (0, 1):  # scripts/cpu_study.sh: Fashion-MNIST, Vanilla teacher, KD from it, SwitOKD
        fake_run(tmp_path, "cpu_study", "vanilla", "t", seed, {"teacher": ("wrn_16_2", 88.0 + seed, 87.0)},
                 dataset="fashionmnist")
        fake_run(tmp_path, "cpu_study", "kd", "kd", seed, {"student": ("wrn_10_1", 86.0 + seed, 85.0)},
                 {"teacher": {"arch": "wrn_16_2"}}, dataset="fashionmnist")
        fake_run(tmp_path, "cpu_study", "switokd", "s", seed, {"student": ("wrn_10_1", 87.0, 86.5 + seed),
                                                              "teacher": ("wrn_16_2", 89.0, 88.0)}, SWITOKD,
                 dataset="fashionmnist")
    cells = {(r["table"], r["row"], r["column"]): r for r in summarize_csv(tmp_path)}
    assert (cells[("cpu_study", "teacher WRN-16-2", "Vanilla")]["best_mean"],
            cells[("cpu_study", "teacher WRN-16-2", "Vanilla")]["n"]) == ("88.5000", "2")
    assert cells[("cpu_study", "student WRN-10-1", "KD")]["best_std"] == f"{math.sqrt(0.5):.4f}"
    assert cells[("cpu_study", "student WRN-10-1", "SwitOKD")]["final_mean"] == "87.0000"
    assert cells[("cpu_study", "student WRN-10-1", "KD")]["paper"] == ""
    assert float(cells[("table2", "A: no switching", "ResNet-32 (student)")]["best_mean"]) == 72.0
    assert float(cells[("table2", "B: fixed delta = 0.6", "ResNet-32 (student)")]["best_mean"]) == 71.0
    assert ("table2", "B: fixed delta = 0.2", "ResNet-32 (student)") not in cells
    assert float(cells[("table2", "C: teacher loss Eqn. (5)", "ResNet-32 (student)")]["best_mean"]) == 70.0
    assert float(cells[("table2", "D: SwitOKD", "ResNet-32 (student)")]["best_mean"]) == 73.0
    assert float(cells[("table2", "D: SwitOKD", "ResNet-32 (student)")]["paper"]) == 73.47
    assert float(cells[("table7", "WRN-16-2 (S/T; 1T2S: S, 2T1S: T)", "SwitOKD (1T2S)")]["best_mean"]) == 68.0
    assert float(cells[("table7", "WRN-16-2 (S/T; 1T2S: S, 2T1S: T)", "SwitOKD (2T1S)")]["best_mean"]) == 69.0
    assert float(cells[("table7", "WRN-16-2 (S/T; 1T2S: S, 2T1S: T)", "SwitOKD (2T1S)")]["paper"]) == 71.73
    assert float(cells[("table7", "WRN-16-2 (S/T; 1T2S: S, 2T1S: T)", "Vanilla")]["best_mean"]) == 73.0
    assert ("table7", "MobileNet (S)", "Vanilla") not in cells
    assert float(cells[("table5", "student WRN-16-2", "KD")]["best_mean"]) == 74.0
    every = {(r["table"], r["row"], r["column"]): r for r in summarize_csv(tmp_path, "--all")}
    assert float(every[("table5", "student WRN-16-2", "RCO")]["paper"]) == 75.36
    hours = cells[("fig7", "DML", "total time (h)")]
    assert float(hours["best_mean"]) == 1.0 and float(hours["paper"]) == 13.43
    assert float(cells[("fig7", "DML", "teacher")]["best_mean"]) == 2.0


def test_summarize_reads_content_not_file_times(tmp_path, capsys):
    """A copied run root (new mtimes), bad results.json files, a diverged run, a hand-made run."""
    good = fake_run(tmp_path, "table4", "dml", "a", 0, {"student": ("resnet20", 70.0, 69.0)})
    os.utime(good / "last.pt", (time.time() + 60, time.time() + 60))       # e.g. after cp -r
    for i, content in enumerate(["[]", "null", '{"networks": {"student": {"arch": 3}}}', "{not json"]):
        bad = tmp_path / "table4" / "dml" / f"bad{i}"
        bad.mkdir(parents=True)
        (bad / "results.json").write_text(content)
    fake_run(tmp_path, "table4", "dml", "nan", 0, {"student": ("resnet20", float("nan"), float("nan"))})
    fake_run(tmp_path / "flat", "", "vanilla", "mine", 0, {"student": ("resnet20", 50.0, 49.0)})  # root/method/run
    out = io.StringIO()
    with redirect_stdout(out):
        assert summarize.main([str(tmp_path)]) == 0
    text, warnings = out.getvalue(), capsys.readouterr().err
    assert "In progress" not in text and warnings.count("warning: skipping") == 4
    assert "- table4/dml/nan-seed0: diverged: non-finite accuracy" in text and "70.00" in text
    runs = io.StringIO()
    with redirect_stdout(runs):
        assert summarize.main([str(tmp_path / "flat"), "--runs", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(runs.getvalue())))
    assert [(r["experiment"], r["method"], r["role"], r["best_top1"]) for r in rows] == [("", "vanilla", "student",
                                                                                          "50.0000")]


def test_summarize_runs_table_has_one_row_per_run_and_network(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, "table4", "switokd", "pair", seed, {"student": ("resnet20", 60.0 + seed, 59.0),
                                                                 "teacher": ("wrn_16_2", 70.0, 70.0)}, SWITOKD)
    rows = summarize_csv(tmp_path, "--runs")
    assert [(r["seed"], r["role"], r["arch"]) for r in rows] == [("0", "student", "resnet20"), ("0", "teacher", "wrn_16_2"),
                                                              ("1", "student", "resnet20"), ("1", "teacher", "wrn_16_2")]
    assert rows[2]["best_top1"] == "61.0000" and rows[0]["switching.rule"] == "paper" and rows[0]["args.seed"] == "0"


def test_published_numbers_fill_every_grid():
    tables = json.loads((SCRIPTS / "published.json").read_text())["tables"]
    assert [t["id"] for t in tables] == ["table2", "table3", "table4", "table5", "table6", "table7", "fig4", "fig1",
                                         "fig5", "fig7", "cpu_study", "okddip_cifar"]
    for table in tables:
        for row in table["rows"]:
            assert len(row["paper"]) == len(table["columns"]), (table["id"], row["name"])
            for value in row["paper"]:
                assert value is None or isinstance(value, float) or (
                    isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value))
    table4 = next(t for t in tables if t["id"] == "table4")
    assert sum(1 for row in table4["rows"] for v in row["paper"] if isinstance(v, list)) == 32


def test_fig7_compares_the_same_quantity(tmp_path):
    """Three runs with known step times, recorded the three ways plot_fig7.py reads them."""
    import plot_fig7
    from torch.utils.tensorboard import SummaryWriter
    epochs, per_epoch = 2, 5
    pair = {"student": ("mobilenetv2", 50.0, 50.0), "teacher": ("resnet18", 60.0, 60.0)}
    rows = "".join(json.dumps({"epoch": e, "time/train_s": 3.0 * per_epoch, "time/iterations": per_epoch,
                               "time/elapsed_s": 1000.0 * e}) + "\n" for e in range(1, epochs + 1))
    runs = {m: fake_run(tmp_path, "fig7", m, "t", 0, pair, dataset="tinyimagenet") for m in ("switokd", "dml", "kdcl")}
    for run in runs.values():
        (run / "metrics.jsonl").write_text(rows)   # KDCL: epoch means of 3 s only
    epoch = np.repeat(np.arange(1, epochs + 1), per_epoch)
    np.savez(runs["switokd"] / "switching.npz", epoch=epoch, seconds=np.full(epochs * per_epoch, 1.0))
    writer = SummaryWriter(runs["dml"] / "tensorboard")
    for step in range(1, epochs * per_epoch + 1):   # 1-based, as the engine logs
        writer.add_scalar("iter/seconds", 2.0, step)
    writer.close()
    records = {m: plot_fig7.iteration_times(summarize.RunRecord(path, "fig7", {})) for m, path in runs.items()}
    assert [records[m]["note"] for m in ("switokd", "dml", "kdcl")] == [
        "per iteration (switching.npz)", "per iteration (TensorBoard)", "epoch means (metrics.jsonl)"]
    assert records["dml"]["x"][-1] == epochs and len(records["dml"]["seconds"]) == epochs * per_epoch
    totals = {m: float(r["cum_h"][-1]) * 3600 for m, r in records.items()}
    assert totals == pytest.approx({"switokd": 10.0, "dml": 20.0, "kdcl": 30.0})
    assert plot_fig7.savings(totals) == ["50.0% less than DML", "66.7% less than KDCL"]
    assert plot_fig7.main([str(tmp_path / "fig7"), "--output", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").read_bytes().startswith(PNG_SIGNATURE)


def test_smoke_and_short_runs_never_shadow_real_ones(tmp_path):
    """Smoke runs have their own root; a run made with other flags is neither skipped nor resumed."""
    smoke = bash("table2_ablation.sh", "--smoke", "--dry-run", env={"OUT": ""}, timeout=120)
    assert smoke.returncode == 0 and "--out runs-smoke/table2 " in smoke.stdout
    run_dir = fake_run(tmp_path, "table2", "switokd", "cifar100-resnet32-wrn_16_2-D-switokd", 0,
                       {"student": ("wrn_10_1", 10.0, 10.0)})
    results = json.loads((run_dir / "results.json").read_text())
    short = ["train_switokd.py", "--dataset", "cifar100", "--student", "resnet32", "--teacher", "wrn_16_2",
             "--epochs", "2", "--seed", "0", "--out", str(tmp_path / "table2"), "--run-name", run_dir.name]
    results["invocations"] = [{"command": short}]
    (run_dir / "results.json").write_text(json.dumps(results))
    real = bash("table2_ablation.sh", "--dry-run", "--seeds", "0", "--out", str(tmp_path), timeout=120)
    assert real.returncode == 0
    line = next(x for x in real.stdout.splitlines() if run_dir.name in x)
    assert line.startswith("# not run: ") and "--epochs 2 -> (not given)" in line and "another --out" in line
    again = bash("table2_ablation.sh", "--dry-run", "--seeds", "0", "--out", str(tmp_path), "--epochs", "2",
                 timeout=120)
    assert f"# finished, skipped: {run_dir}" in again.stdout  # the same flags: the same run


def test_gpu_check_dry_run_prints_the_plan(tmp_path):
    """scripts/gpu_check.sh cannot rot on a CPU: its plan names every training script and part."""
    done = bash("gpu_check.sh", str(tmp_path / "gc"), "--dry-run", timeout=120)
    assert done.returncode == 0, done.stderr
    limits = [int(n) for n in re.findall(r"^# .+ \(limit (\d+) s\)$", done.stdout, re.M)]
    assert len(limits) == 16 and "within 480 s" in done.stdout
    for script in ("train_vanilla", "train_switokd", "train_kd", "train_multi", "train_dml", "train_kdcl",
                   "train_okddip", "train_one"):
        assert f"-- {script}.py " in done.stdout, script
    for needed in ("-m pytest -m cuda", "torch.distributed.run", "--sync-bn", "scripts/benchmark.py --device cuda",
                   "--amp fp16", "--amp bf16", "--channels-last", "--compile", "--loader torch", "--deterministic"):
        assert needed in done.stdout, needed
    assert all(0 < limit <= 120 for limit in limits) and not (tmp_path / "gc").exists()

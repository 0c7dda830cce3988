"""Every CUDA path in a few minutes: the CUDA tests, a short run of every training script with the
speed flags, DDP under torchrun, the benchmark's CUDA rows; one JSON and one Markdown summary.

    bash scripts/gpu_check.sh OUT_DIR            # on a CUDA machine, no internet, no data set needed
    bash scripts/gpu_check.sh OUT_DIR --dry-run  # the plan (what the suite checks on a CPU)

Each part runs as its own process with its own time limit; one that fails or runs out of time
is recorded as such and the next part runs. The data are written first: CIFAR-100-format files
(the python pickles of ``cifar-100-python/``) of synthetic images, so that the real CIFAR loading
code runs; torchvision checks those files against the official archive's checksums, so the
training parts run the scripts through ``python scripts/gpu_check.py train`` (torchvision's
checksum table set to these files' checksums, nothing else changed). Written to OUT_DIR:
``summary.json``, ``summary.md``, ``logs/<part>.log``, the runs under ``runs/``, the tests'
``cuda-tests.xml`` and the benchmark's ``benchmark.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 480
TINY = ["--dataset", "cifar100", "--train-subset", "2000", "--test-subset", "1000", "--epochs", "2",
        "--no-progress", "--device", "cuda"]
PAIR = ["--student", "mobilenetv2_0.5", "--teacher", "wrn_16_2"]


@dataclasses.dataclass
class Part:
    name: str
    argv: list[str]
    limit_s: int
    run_dir: str | None = None  # a training run's directory, relative to OUT_DIR (its results are summarised)


def training(name: str, script: str, flags: list[str], limit_s: int = 40) -> Part:
    run = f"runs/{name}"
    return Part(f"train {name}", [sys.executable, "scripts/gpu_check.py", "train", "{out}", "--", script, *TINY,
                                  *flags, "--data-root", "{out}/data", "--out", "{out}/runs", "--run-name", name],
                limit_s, run)


def plan(gpus: int) -> list[Part]:
    """The parts, in order, with their time limits; together they stop at BUDGET_S (a part that would
    start later is recorded as not run)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={max(gpus, 1)}"]
    return [  # what must run first; then one run of every training script; DDP; the benchmark; more flags
        Part("environment", [sys.executable, "scripts/gpu_check.py", "environment", "{out}"], 30),
        Part("data", [sys.executable, "scripts/gpu_check.py", "data", "{out}"], 20),
        Part("cuda tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                            "tests/test_cuda.py", "--junitxml", "{out}/cuda-tests.xml"], 120),
        training("vanilla-fp16", "train_vanilla.py", ["--model", "wrn_16_2", "--role", "teacher", "--amp", "fp16"]),
        training("switokd-fp16", "train_switokd.py", [*PAIR, "--amp", "fp16"]),
        training("kd-bf16-cl", "train_kd.py", ["--student", "resnet20", "--teacher-ckpt",
                                               "{out}/runs/vanilla/vanilla-fp16", "--amp", "bf16", "--channels-last"]),
        training("multi-fp16", "train_multi.py", ["--teachers", "wrn_16_2", "--students", "resnet20", "mobilenet",
                                                  "--amp", "fp16"]),
        training("dml-deterministic", "train_dml.py", ["--models", "resnet20", "wrn_16_2", "--deterministic"]),
        training("kdcl-bf16", "train_kdcl.py", ["--models", "resnet20", "wrn_16_2", "--amp", "bf16"]),
        training("okddip-bf16", "train_okddip.py", ["--backbone", "resnet32", "--amp", "bf16"]),
        training("one-fp16", "train_one.py", ["--backbone", "resnet32", "--method", "one", "--amp", "fp16"]),
        Part("ddp", [*torchrun, "scripts/gpu_check.py", "train", "{out}", "--", "train_switokd.py", *TINY, *PAIR,
                     "--sync-bn", "--data-root", "{out}/data", "--out", "{out}/runs", "--run-name", "ddp"],
             60, "runs/switokd/ddp"),
        Part("benchmark", [sys.executable, "scripts/benchmark.py", "--device", "cuda", "--amp-modes", "fp32", "bf16",
                           "fp16", "bf16+cl", "--iters", "10", "--repeats", "3", "--json", "{out}/benchmark.json"],
             120),
        training("switokd-bf16-cl", "train_switokd.py", [*PAIR, "--amp", "bf16", "--channels-last"]),
        training("switokd-loader-torch", "train_switokd.py", [*PAIR, "--loader", "torch", "--workers", "4"]),
        training("switokd-compile", "train_switokd.py", [*PAIR, "--compile"], 90),
    ]


# --------------------------------------------------------------------------- the parts' own work

def write_cifar100(root: Path, n_train: int = 5000, n_test: int = 1000) -> None:
    """``root/cifar-100-python/{train,test,meta}`` in the real format, of learnable synthetic images."""
    import numpy as np
    base = root / "cifar-100-python"
    if (base / "meta").is_file():
        return
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, size=(100, 3 * 32 * 32)).astype(np.int16)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 100
        noise = rng.integers(-60, 61, size=(n, 3 * 32 * 32))
        images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        record = {"data": images, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                  "filenames": [f"{i}.png" for i in range(n)]}
        (base / name).write_bytes(pickle.dumps(record, protocol=2))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def trust_written_files(root: Path) -> None:
    """Set torchvision's CIFAR-100 checksum table to the checksums of the files written here."""
    from torchvision.datasets import CIFAR100
    base = root / "cifar-100-python"

    def md5(name):
        return hashlib.md5((base / name).read_bytes()).hexdigest()
    CIFAR100.train_list = [["train", md5("train")]]
    CIFAR100.test_list = [["test", md5("test")]]
    CIFAR100.meta = {**CIFAR100.meta, "md5": md5("meta")}


def environment(out: Path) -> None:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "capability": [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())],
            "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "cpus": os.cpu_count()}
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    if not info["gpus"]:
        raise SystemExit("gpu_check.py: error: no CUDA device")


def train(out: Path, argv: list[str]) -> None:
    """Run a training script as ``python SCRIPT FLAGS`` would, on the files written by ``data``."""
    trust_written_files(out / "data")
    sys.path.insert(0, str(REPO))
    sys.argv = [str(REPO / argv[0]), *(a.replace("{out}", str(out)) for a in argv[1:])]
    runpy.run_path(sys.argv[0], run_name="__main__")


# --------------------------------------------------------------------------- running and summarising

def run_part(part: Part, out: Path, remaining_s: float) -> dict:
    limit = max(1, min(part.limit_s, int(remaining_s)))
    argv = [a.replace("{out}", str(out)) for a in part.argv]
    log = out / "logs" / f"{part.name.replace(' ', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        try:
            code = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"stopped at its limit of {limit} s"
    record = {"part": part.name, "status": status, "seconds": round(time.perf_counter() - start, 1),
              "limit_s": limit, "log": str(log.relative_to(out))}
    if part.run_dir:
        record.update(run_summary(out / part.run_dir))
    if part.name == "cuda tests":
        record.update(test_summary(out / "cuda-tests.xml"))
    if part.name == "benchmark" and (out / "benchmark.json").is_file():
        record["benchmark"] = json.loads((out / "benchmark.json").read_text())
    return record


def run_summary(run_dir: Path) -> dict:
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    nets = {role: round(info["best_top1"], 2) for role, info in results.get("networks", {}).items()}
    return {"run_status": results.get("status"), "best_top1": nets, "wall_s": round(results.get("wall_time_s", 0), 1),
            "amp": results.get("settings", {}).get("amp"), "world_size": results.get("world_size"),
            "expert_fraction": results.get("expert_fraction"),
            "seconds_per_iteration": results.get("seconds_per_iteration")}


def test_summary(xml: Path) -> dict:
    import xml.etree.ElementTree as ET
    try:
        suite = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {"tests": {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}}


def markdown(records: list[dict], total_s: float) -> str:
    lines = ["# GPU check", "", f"{len(records)} parts in {total_s:.0f} s.", "",
             "| part | status | seconds | what it measured |", "|---|---|---|---|"]
    for r in records:
        measured = []
        if "tests" in r:
            measured.append(", ".join(f"{k} {v}" for k, v in r["tests"].items()))
        if "best_top1" in r:
            measured.append(f"top-1 {r['best_top1']}, {r['run_status']}, world size {r['world_size']}")
            if r.get("expert_fraction") is not None:
                measured.append(f"expert fraction {r['expert_fraction']:.2f}")
        if "benchmark" in r:
            measured.append("see benchmark.json")
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']} | {'; '.join(measured)} |")
    return "\n".join(lines) + "\n"


def check(out: Path, dry_run: bool) -> int:
    gpus = 0
    if not dry_run:
        import torch
        gpus = torch.cuda.device_count()
    parts = plan(gpus)
    if dry_run:
        print(f"# gpu_check: {len(parts)} parts, each with its own time limit, all within {BUDGET_S} s")
        for part in parts:
            print(f"# {part.name} (limit {part.limit_s} s)")
            print(shlex.join([a.replace("{out}", str(out)) for a in part.argv]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    start, records = time.perf_counter(), []
    for part in parts:
        remaining = BUDGET_S - (time.perf_counter() - start)
        if remaining < 5:
            records.append({"part": part.name, "status": "not run: the budget is spent", "seconds": 0})
            continue
        records.append(run_part(part, out, remaining))
        print(f"{records[-1]['part']}: {records[-1]['status']} ({records[-1]['seconds']} s)", flush=True)
        summary = {"total_s": round(time.perf_counter() - start, 1), "parts": records}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # kept current: a kill keeps it
        (out / "summary.md").write_text(markdown(records, summary["total_s"]))
    return 0 if all(r["status"] == "passed" for r in records) else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        if len(argv) < 4 or argv[2] != "--":
            raise SystemExit("usage: gpu_check.py train OUT_DIR -- SCRIPT FLAGS...")
        train(Path(argv[1]), argv[3:])
        return 0
    if argv[:1] in (["environment"], ["data"]):
        out = Path(argv[1])
        if argv[0] == "environment":
            environment(out)
        else:
            write_cifar100(out / "data")
        return 0
    p = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=Path("gpu-check"), help="folder for the results")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = p.parse_args(argv)
    return check(args.out.absolute(), args.dry_run)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # --dry-run | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)

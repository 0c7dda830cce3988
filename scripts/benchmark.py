"""Throughput benchmark: images per second of the model compute, the method iterations and the training loop.

Everything runs through the real engine (a ``utils.Run`` built from each training script's
own flags) on a CIFAR-100-shaped synthetic set (``--classes`` classes, 32x32 images), one
iteration = one mini-batch of ``--batch-size`` images. Sections (``--only``):

a  bare model compute, the yardstick: forward of both networks, the cross-entropy of
   each, one backward pass through their sum; no optimiser step, one fixed batch already
   on the device. Beside it, its parts (each network's forward+backward, the teacher's
   forward with autograd on, as in expert mode, and under no_grad) and "compute + steps"
   (the same plus both optimisers' steps).
b  SwitOKD iterations: ``train_switokd.train_step`` (forwards, the switching decision,
   Eqns. 5/6/8, the one copy to the host, backward, optimiser steps) and ``Run.log`` on the
   fixed batch, with the mode forced by the script's own flags: learning mode
   (``--no-switching``: both networks learn) and expert mode (``--switch-rule algorithm1
   --fixed-delta 0``: the teacher is paused, no backward through it, no step).
c  ``train_dml.train_step`` (simultaneous update) and ``train_kdcl.train_step`` (MinLogit,
   two augmented views per batch, so twice the images through the networks per iteration).
d  epoch slices: ``--iters`` consecutive batches drawn from ``Run.train_batches()`` with
   each loader (``torch``: DataLoader workers running the torchvision transforms on PIL
   images, as torchvision's CIFAR dataset serves them; ``tensor``: the whole split on the
   device, augmented per batch), each batch running (i) the bare compute of section a,
   which isolates the cost of the data pipeline, and (ii) the full SwitOKD iteration with
   its natural switching.

Each measurement: ``--warmup`` untimed iterations, then ``--repeats`` timed rounds of
``--iters`` iterations (the device synchronised before each clock read). Within a round
the rows take turns (all but the DataLoader slices, which run alone), so that a change of
load on a shared machine hits every row alike. The table shows the median images/s, the
min-max range over rounds and the time ratio to the bare compute of the same precision
mode (the median of the per-round ratios); three ratios are checked at the end against
the bounds a training step should meet (``TARGETS``).

``--amp-modes`` lists the precision modes: fp32, bf16 or fp16 (autocast; fp16 adds the
GradScaler), each optionally suffixed with ``+cl`` (channels_last) and/or ``+compile``
(torch.compile). On a CPU shared with other jobs, give ``--threads`` the number of idle
cores: an OpenMP thread waiting for a descheduled sibling makes timings erratic. Example::

    python scripts/benchmark.py --json results/benchmark.json
    python scripts/benchmark.py --quick                 # a smoke check of every section
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import train_dml  # noqa: E402
import train_kdcl  # noqa: E402
import train_switokd  # noqa: E402
import utils  # noqa: E402

SECTIONS = ("a", "b", "c", "d")
PRECISIONS = ("fp32", "bf16", "fp16")
TARGETS = (  # (what, row, reference row, at most), fp32: what a step should cost beside the bare compute
    ("SwitOKD learning iteration / bare compute", "switokd learning", "bare compute", 1.10),
    ("SwitOKD expert iteration / learning iteration", "switokd expert", "switokd learning", 0.60),
    ("tensor-loader epoch slice / bare compute", "slice tensor: bare compute", "bare compute", 1.05),
)


# --------------------------------------------------------------------------- modes and flags

def parse_mode(text: str) -> dict:
    """``bf16+cl+compile`` -> {"name", "amp", "channels_last", "compile"}."""
    precision, *options = text.split("+")
    if precision not in PRECISIONS or not set(options) <= {"cl", "compile"}:
        raise argparse.ArgumentTypeError(f"bad mode {text!r}: use fp32, bf16 or fp16, optionally "
                                         "followed by +cl and/or +compile (e.g. bf16+cl)")
    return {"name": text, "amp": None if precision == "fp32" else precision,
            "channels_last": "cl" in options, "compile": "compile" in options}


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.add_argument("--teacher", default="wrn_16_2")
    p.add_argument("--student", default="mobilenetv2_0.5")
    p.add_argument("--batch-size", type=utils.POSITIVE_INT, default=128)
    p.add_argument("--classes", type=utils.POSITIVE_INT, default=100, help="classes of the synthetic set")
    p.add_argument("--iters", type=utils.POSITIVE_INT, help="iterations per timed repeat (default 5; --quick 2)")
    p.add_argument("--repeats", type=utils.POSITIVE_INT, help="timed repeats (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 2; --quick 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=utils.POSITIVE_INT, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the torch loader")
    p.add_argument("--amp-modes", nargs="+", type=parse_mode, metavar="MODE",
                   help="precision modes (default: fp32 bf16 fp32+cl bf16+cl; --quick: fp32 bf16+cl)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument("--quick", action="store_true", help="a smoke check: fewer iterations and modes")
    args = p.parse_args(argv)
    quick = args.quick
    args.iters = args.iters or (2 if quick else 5)
    args.repeats = args.repeats or (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.amp_modes = args.amp_modes or [parse_mode(m) for m in
                                        (("fp32", "bf16+cl") if quick else ("fp32", "bf16", "fp32+cl", "bf16+cl"))]
    return args


# --------------------------------------------------------------------------- the engine on synthetic data

class PilImages(Dataset):
    """An in-memory split served as torchvision's CIFAR serves its own: a PIL image through the transform."""

    def __init__(self, images, targets, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()   # N, H, W, C uint8, like CIFAR.data
        self.targets, self.transform = targets.tolist(), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.targets[index]


def cifar_like(options):
    """``datasets.build("synthetic", synthetic=options)`` with CIFAR's PIL item path for the torch loader."""
    bundle = datasets.build("synthetic", synthetic=options)
    for split in ("train", "test"):
        images, targets = getattr(bundle, f"{split}_arrays")
        setattr(bundle, split, PilImages(images, targets, getattr(bundle, split).transform))
    return bundle


def make_run(script, argv, bench, mode, loader, images, out, data_options=None):
    """A real ``utils.Run`` of ``script`` (its own ``parse_args``) on the synthetic set; returns (run, args)."""
    argv = [*argv, "--dataset", "synthetic", "--device", bench.device, "--batch-size", str(bench.batch_size),
            "--loader", loader, "--workers", str(bench.workers), "--threads", str(torch.get_num_threads()),
            "--epochs", "1", "--no-progress",
            "--out", out, "--run-name", f"{loader}-{mode['name']}-{time.monotonic_ns()}"]
    argv += ["--amp", mode["amp"]] if mode["amp"] else []
    argv += ["--channels-last"] if mode["channels_last"] else []
    argv += ["--compile"] if mode["compile"] else []
    args = script.parse_args(argv)
    options = {"num_classes": bench.classes, "image_size": 32, "train_size": images, "test_size": bench.classes}

    class SyntheticRun(utils.Run):
        def _build_data(self, args, holdout):  # the engine's data step, on the benchmark's set
            return cifar_like(options)
    with contextlib.redirect_stdout(io.StringIO()):  # no start banner for each of the benchmark's runs
        run = SyntheticRun(args, script.__name__.removeprefix("train_"), networks_of(script, args),
                           data_options=data_options)
    return run, args


def networks_of(script, args):
    if script is train_switokd:
        return {"student": args.student, "teacher": args.teacher}
    return utils.cohort(args.models, args.roles)


# --------------------------------------------------------------------------- the iterations

def bare_compute(run, roles):
    """Section a: forward of each network in ``roles``, cross-entropy, one backward; no step."""
    nets = [run.nets[role] for role in roles]

    def step(images, targets):
        with run.precision.autocast():
            logits = [net(images).float() for net in nets]
        for net in nets:
            net.zero_grad(set_to_none=True)
        run.precision.backward(sum(F.cross_entropy(z, targets) for z in logits))
    return step


def compute_and_steps(run):
    """Section a: the bare compute of every network plus every optimiser's step."""
    compute, optimizers = bare_compute(run, list(run.nets)), list(run.optimizers.values())

    def step(images, targets):
        compute(images, targets)
        run.precision.step(*optimizers)
    return step


def forward_only(run, role, grad):
    """Section a: one network's forward pass, with autograd recording (``grad``) or under no_grad."""
    net = run.nets[role]

    def step(images, targets):
        with torch.set_grad_enabled(grad), run.precision.autocast():
            net(images).float()
    return step


def switokd_iteration(run, args, mode=None):
    """``train_switokd.train_step`` and ``Run.log``: the loop body of train_switokd.py.

    ``mode`` forces it through the script's own flags: ``"learning"`` (``--no-switching``),
    ``"expert"`` (``--switch-rule algorithm1 --fixed-delta 0``: G > 0 always); None keeps the
    natural switching.
    """
    forced = {"learning": dict(no_switching=True), "expert": dict(switch_rule="algorithm1", fixed_delta=0.0),
              None: {}}[mode]
    cfg = argparse.Namespace(**{**vars(args), **forced})
    student, teacher = run.nets["student"], run.nets["teacher"]
    opt_s, opt_t = run.optimizers["student"], run.optimizers["teacher"]

    def step(images, targets):
        run.log(train_switokd.train_step(student, teacher, opt_s, opt_t, images, targets, cfg, run.precision))
    return step


def dml_iteration(run, args):
    """``train_dml.train_step`` (simultaneous update) and ``Run.log``: the loop body of train_dml.py."""
    def step(images, targets):
        run.log(train_dml.train_step(run.nets, run.optimizers, images, targets, args.tau, run.precision))
    return step


def kdcl_iteration(run, args, views):
    """``train_kdcl.train_step`` (one augmented view per network) and ``Run.log``: train_kdcl.py's loop body."""
    def step(images, targets):
        run.log(train_kdcl.train_step(run.nets, run.optimizers, images, targets, views, args.ensemble, None,
                                      args.tau, args.lam, run.precision))
    return step


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Job:
    """One row of the table: ``step(images, targets)`` fed from ``batches``."""

    section: str
    name: str
    run: utils.Run
    step: object
    batches: object
    interleave: bool = True
    seconds: list = dataclasses.field(default_factory=list)

    def time(self, iterations):
        start = time.perf_counter()
        for _ in range(iterations):
            self.step(*next(self.batches))
        if self.run.device.type == "cuda":
            torch.cuda.synchronize(self.run.device)
        return time.perf_counter() - start


def measure(jobs, bench):
    """Warm every job up, then time ``bench.repeats`` rounds of ``bench.iters`` iterations of each.

    Interleaved jobs take turns within each round, so that a change of the machine's load
    hits them alike and their per-round ratios stay meaningful on a shared machine. The
    others (a DataLoader, whose workers would prefetch while other jobs run) run alone.
    """
    together = [job for job in jobs if job.interleave]
    for job in together:
        job.time(bench.warmup)
    for _ in range(bench.repeats):
        for job in together:
            job.seconds.append(job.time(bench.iters))
    for job in jobs:
        if not job.interleave:
            job.time(bench.warmup)
            job.seconds = [job.time(bench.iters) for _ in range(bench.repeats)]


def row(job, mode, bench):
    """A measured job as a table row (images per second over the repeats)."""
    images = bench.iters * bench.batch_size
    rates = sorted(images / t for t in job.seconds)
    quartiles = statistics.quantiles(rates, n=4) if len(rates) > 1 else rates * 3
    return {"section": job.section, "name": job.name, "mode": mode, "median_ips": statistics.median(rates),
            "min_ips": rates[0], "max_ips": rates[-1], "iqr_ips": quartiles[2] - quartiles[0],
            "median_s_per_iter": statistics.median(job.seconds) / bench.iters,
            "repeat_seconds": job.seconds, "interleaved": job.interleave, "load_average": os.getloadavg()[0]}


def ratio(a, b):
    """Time of row ``a`` over row ``b``: the median of the per-round ratios when both were
    interleaved, else the ratio of the medians."""
    if a["interleaved"] and b["interleaved"]:
        return statistics.median(x / y for x, y in zip(a["repeat_seconds"], b["repeat_seconds"]))
    return a["median_s_per_iter"] / b["median_s_per_iter"]


def fixed_batch(run):
    return next(iter(run.train_batches()))


def mode_jobs(bench, mode, new_run):
    """The jobs of every asked section in one precision mode."""
    pair = ["--student", bench.student, "--teacher", bench.teacher]
    cohort = ["--models", bench.student, bench.teacher]
    jobs = []

    def add(section, name, run, step, batches=None, interleave=True):
        jobs.append(Job(section, name, run, step, batches or itertools.repeat(fixed_batch(run)), interleave))

    if {"a", "b", "d"} & set(bench.only):
        run, args = new_run(train_switokd, pair)
        add("a", "bare compute", run, bare_compute(run, ["student", "teacher"]))  # every ratio's yardstick
        if "a" in bench.only:
            for role in ("teacher", "student"):
                add("a", f"{role} fwd+bwd", run, bare_compute(run, [role]))
            add("a", "teacher fwd (grad on)", run, forward_only(run, "teacher", True))
            add("a", "teacher fwd (no_grad)", run, forward_only(run, "teacher", False))
            add("a", "compute + steps", run, compute_and_steps(run))
        if "b" in bench.only:
            add("b", "switokd learning", run, switokd_iteration(run, args, "learning"))
            add("b", "switokd expert", run, switokd_iteration(run, args, "expert"))
        if "d" in bench.only:
            for loader in ("tensor", "torch"):
                for what, step in (("bare compute", lambda r: bare_compute(r, ["student", "teacher"])),
                                   ("switokd", lambda r: switokd_iteration(r, args))):
                    slice_run = new_run(train_switokd, pair, loader)[0]  # its own loader and networks
                    add("d", f"slice {loader}: {what}", slice_run, step(slice_run), endless_batches(slice_run),
                        interleave=loader == "tensor")
    if "c" in bench.only:
        run, args = new_run(train_dml, cohort)
        add("c", "dml", run, dml_iteration(run, args))
        run, args = new_run(train_kdcl, cohort, data_options={"views": 2})
        add("c", "kdcl (2 views)", run, kdcl_iteration(run, args, 2))
    return jobs


def run_mode(bench, mode, out):
    """Measure every asked section in one precision mode; returns the table rows."""
    train_size = bench.batch_size * (bench.warmup + bench.repeats * bench.iters)
    opened = []

    def new_run(script, argv, loader="tensor", data_options=None):
        run, args = make_run(script, argv, bench, mode, loader, train_size, out, data_options)
        opened.append(run)
        return run, args

    try:
        jobs = mode_jobs(bench, mode, new_run)
        measure(jobs, bench)
    finally:
        for run in opened:
            run.writer.close()
            run.dir.release()
    rows = [row(job, mode["name"], bench) for job in jobs]
    bare = next((r for r in rows if r["name"] == "bare compute"), None)
    for r in rows if bare else ():
        r["x_bare"] = ratio(r, bare)
    return rows


def endless_batches(run):
    """``run.train_batches()`` epoch after epoch (the same epoch's order, as no epoch ends)."""
    while True:
        yield from run.train_batches()


# --------------------------------------------------------------------------- report

def machine(bench):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = utils.choose_device(bench.device)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average_start": os.getloadavg()}


def check_targets(results):
    """The TARGETS (fp32 rows): measured ratio, bound, met."""
    by = {(r["name"], r["mode"]): r for r in results}
    checks = []
    for what, name, reference, bound in TARGETS:
        if (name, "fp32") in by and (reference, "fp32") in by:
            value = ratio(by[(name, "fp32")], by[(reference, "fp32")])
            checks.append({"target": what, "ratio": value, "at_most": bound, "met": value <= bound})
    return checks


def print_row(r):
    x = f"{r['x_bare']:.2f}x" if "x_bare" in r else "-"
    print(f"{r['section']}  {r['name']:<30} {r['mode']:<16} {r['median_ips']:9.1f} "
          f"{r['min_ips']:9.1f}-{r['max_ips']:<9.1f} {r['median_s_per_iter'] * 1000:9.1f} {x:>7}  "
          f"{r['load_average']:5.2f}", flush=True)


def main(argv=None):
    bench = parse_args(argv)
    if bench.threads:
        torch.set_num_threads(bench.threads)
    info = machine(bench)
    print(f"# {info['cpu']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads), "
          f"torch {info['torch']}, device {info['device']}{' ' + info['gpu'] if info['gpu'] else ''}, "
          f"load average {info['load_average_start'][0]:.2f}")
    print(f"# teacher {bench.teacher}, student {bench.student}, batch {bench.batch_size}, "
          f"{bench.classes} classes; {bench.warmup} warm-up + {bench.repeats} x {bench.iters} iterations")
    print(f"s  {'what':<30} {'mode':<16} {'img/s':>9} {'min-max img/s':>19} {'ms/iter':>9} {'x bare':>7}  load")
    results = []
    with tempfile.TemporaryDirectory(prefix="benchmark-") as out:
        for mode in bench.amp_modes:
            for r in run_mode(bench, mode, out):
                results.append(r)
                print_row(r)
    checks = check_targets(results)
    for c in checks:
        print(f"target: {c['target']}: {c['ratio']:.3f} (at most {c['at_most']}) "
              f"{'met' if c['met'] else 'MISSED'}")
    info["load_average_end"] = os.getloadavg()
    if bench.json:
        bench.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(bench).items() if k not in ("json", "amp_modes")}
        config["amp_modes"] = [m["name"] for m in bench.amp_modes]
        utils.save_json(bench.json, {"machine": info, "config": config, "results": results, "targets": checks})
    return {"machine": info, "results": results, "targets": checks}


if __name__ == "__main__":
    utils.main_guard(main)

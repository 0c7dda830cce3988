"""Run the plan of one experiment script (scripts/*.sh): skip, resume, parallel, smoke.

The experiment scripts (through scripts/common.sh) write a plan, one line per run or
barrier, each line shell-quoted::

    run <experiment> <run-name> <training script> <flags...>
    barrier

and hand it to this program. For every run it decides:

* ``<out>/<experiment>/<method>/<run-name>/results.json`` says ``"status": "finished"``: skipped;
* its results.json records other flags than the plan's (a smoke or ``--epochs`` run of the
  same name, say): neither skipped nor resumed, reported with the flags that differ;
* ``last.pt`` exists there: interrupted, continued with ``--resume``;
* otherwise started fresh.

Runs between two barriers are independent and run in parallel, one per GPU slot
(``CUDA_VISIBLE_DEVICES``; a slot of several GPUs runs the script under torchrun);
a barrier waits for every run before it (e.g. KD waits for its pretrained teacher).
Each run's output goes to ``<out>/<experiment>/logs/<method>-<run-name>.log``.
A run listed twice with the same flags (a figure script that names the runs of a table
it reads) runs once; listed twice with other flags, it is an error. A run that another
process trains (its directory's lock is held: a second launcher on the same plan) is
waited for, then skipped if that process finished it.

``--slurm`` submits the runs as Slurm jobs instead, one per run, a job array per phase,
through submitit, with the same semantics (scripts/slurm_backend.py): ``--partition``,
``--time``, ``--account``, ``--sbatch`` and ``--gpus-per-run`` say what each job asks for;
``--slurm-local`` runs those jobs through submitit's local executor on this machine.

``--smoke`` turns every run into a tiny one on the same code path: ``digits`` data,
16 training and 16 test images, batch 8, one epoch, CPU, every network replaced by a
small Wide ResNet of the same capacity class (:data:`SMOKE_MODELS`; the OKDDip release's
networks by its ResNet-32, :data:`OKDDIP_SMOKE_BACKBONE`). ``--in-process``
runs the commands one after another inside this process (exactly what ``python
script.py flags`` runs, without paying Python's and torch's start-up for every run);
smoke runs use one CPU thread (``OMP_NUM_THREADS=1``), much faster for tiny networks on a
busy machine. ``--dry-run`` prints the commands; its GPU assignment is round-robin, while a
real run gives each run the next GPU slot that frees up.

Exit status: 0 when every run finished, 1 when some failed (listed at the end with
their logs), 2 for bad input, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import runpy
import shlex
import signal
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

METHODS = {
    "train_vanilla.py": "vanilla", "train_kd.py": "kd", "train_dml.py": "dml",
    "train_kdcl.py": "kdcl", "train_switokd.py": "switokd", "train_multi.py": "switokd_multi",
    "train_okddip.py": "okddip", "train_one.py": "one",
}
"""The folder each training script writes its runs to (``Run(args, method, ...)``)."""
METHOD_FLAGS = {"train_kd.py": "--distill"}
"""Scripts whose flag names the method, and so the folder (train_kd.py --distill fitnet: ``fitnet``)."""

SMOKE_FLAGS = {"--dataset": "digits", "--train-subset": "16", "--test-subset": "16", "--batch-size": "8",
               "--test-batch-size": "16", "--epochs": "1", "--workers": "0", "--device": "cpu"}
SMOKE_MODELS = {
    **dict.fromkeys(["resnet20", "resnet32", "wrn_16_1", "wrn_16_2", "mobilenetv2_0.5"], "wrn_10_1"),
    **dict.fromkeys(["wrn_16_4", "wrn_40_2", "mobilenet", "mobilenetv2", "mobilenetv2_1.4"], "wrn_10_2"),
    **dict.fromkeys(["wrn_16_8", "wrn_16_10", "resnet18", "resnet34"], "wrn_10_3"),
}
"""Smoke mode: each network -> a small WRN by parameter count (< 1M, 1-5M, > 5M), so that
larger teachers stay larger; a name not listed becomes ``wrn_10_1``."""
MODEL_FLAGS = ("--model", "--student", "--teacher", "--models", "--teachers", "--students", "--backbone")
OKDDIP_SMOKE_BACKBONE = "resnet32"
"""Smoke mode for the OKDDip release's networks, which have no small WRN (``--backbone``, ``<method>:<backbone>``
names, any network under ``--recipe okddip`` / ``--arch-variant okddip``): every backbone -> its smallest
CIFAR backbone; ``-shared`` (DenseNet only) is dropped, ``@m`` kept."""


def smoke_model(name: str, okddip: bool) -> str:
    """The network a smoke run trains instead of ``name`` (see :data:`SMOKE_MODELS`, :data:`OKDDIP_SMOKE_BACKBONE`)."""
    if ":" in name:
        method, _, rest = name.partition(":")
        branches = rest.partition("@")[2]
        return f"{method}:{OKDDIP_SMOKE_BACKBONE}" + (f"@{branches}" if branches else "")
    return OKDDIP_SMOKE_BACKBONE if okddip else SMOKE_MODELS.get(name, "wrn_10_1")


class PlanError(Exception):
    """A malformed plan or bad option; reported as one line, exit status 2."""


@dataclass
class Job:
    experiment: str
    name: str
    script: str
    flags: list[str]

    @property
    def method(self) -> str:
        chosen = flag_values(self.flags, METHOD_FLAGS[self.script]) if self.script in METHOD_FLAGS else None
        return chosen[0] if chosen else METHODS[self.script]

    def run_dir(self, out: Path) -> Path:
        return out / self.experiment / self.method / self.name

    def log(self, out: Path) -> Path:
        return out / self.experiment / "logs" / f"{self.method}-{self.name}.log"


# --------------------------------------------------------------------------- the plan

def read_plan(text: str) -> list[list[Job]]:
    """The plan's runs, split at barriers into phases of independent runs; a run listed again is dropped."""
    phases: list[list[Job]] = [[]]
    seen: dict[tuple, tuple] = {}  # (experiment, method, name) -> (line number, flags)
    for number, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line)
        except ValueError as e:  # an unbalanced quote
            raise PlanError(f"plan line {number}: {e} in {line!r}") from None
        if not words:
            continue
        if words == ["barrier"]:
            phases.append([])
        elif words[0] == "run" and len(words) >= 4:
            experiment, name, script, flags = words[1], words[2], Path(words[3]).name, words[4:]
            if script not in METHODS:
                raise PlanError(f"plan line {number}: unknown training script {words[3]!r}; "
                                f"accepted: {', '.join(METHODS)}")
            job = Job(experiment, name, script, flags)
            key = (experiment, job.method, name)
            if key in seen:
                if seen[key][1] != flags:
                    raise PlanError(f"plan line {number}: run {'/'.join(key)} of line {seen[key][0]} again, "
                                    f"with other flags: {shlex.join(flags)} (was {shlex.join(seen[key][1])})")
                continue
            seen[key] = (number, flags)
            phases[-1].append(job)
        else:
            raise PlanError(f"plan line {number}: expected 'run EXPERIMENT NAME SCRIPT FLAGS...' "
                            f"or 'barrier', got {line!r}")
    return [phase for phase in phases if phase]


def set_flag(flags: list[str], flag: str, values: list[str]) -> list[str]:
    """``flags`` with ``flag``'s value(s) replaced by ``values`` (appended when absent)."""
    out, i, found = [], 0, False
    while i < len(flags):
        if flags[i] == flag:
            i += 1
            while i < len(flags) and not flags[i].startswith("--"):
                i += 1
            if not found:
                out += [flag, *values]
                found = True
        else:
            out.append(flags[i])
            i += 1
    return out if found else out + [flag, *values]


def flag_values(flags: list[str], flag: str) -> list[str] | None:
    """The value(s) following ``flag`` in ``flags`` (None when absent)."""
    if flag not in flags:
        return None
    i = flags.index(flag) + 1
    values = []
    while i < len(flags) and not flags[i].startswith("--"):
        values.append(flags[i])
        i += 1
    return values


def smoke_flags(flags: list[str]) -> list[str]:
    """A run's flags made tiny: see the module docstring."""
    okddip = "okddip" in (flag_values(flags, "--recipe") or []) + (flag_values(flags, "--arch-variant") or [])
    for flag in MODEL_FLAGS:
        names = flag_values(flags, flag)
        if names:
            flags = set_flag(flags, flag, [smoke_model(n, okddip or flag == "--backbone") for n in names])
    flags = [f for f in flags if f != "--shared-dense-block"]
    for flag, value in SMOKE_FLAGS.items():
        flags = set_flag(flags, flag, [value])
    return flags if "--no-progress" in flags else flags + ["--no-progress"]


def command(job: Job, opts, resume: bool) -> list[str]:
    """The training command of one run (without the interpreter)."""
    flags = list(job.flags)
    if opts.data_root:
        flags = set_flag(flags, "--data-root", [opts.data_root])
    if opts.epochs:
        flags = set_flag(flags, "--epochs", [str(opts.epochs)])
    flags += opts.extra
    if opts.smoke:
        flags = smoke_flags(flags)
    flags += ["--out", str(opts.out / job.experiment), "--run-name", job.name]
    return [str(REPO / job.script), *flags, *(["--resume"] if resume else [])]


def status(job: Job, out: Path) -> str:
    """finished (its results.json says so), interrupted (it has last.pt) or new."""
    run_dir = job.run_dir(out)
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    if isinstance(results, dict) and results.get("status") == "finished":
        return "finished"
    return "interrupted" if (run_dir / "last.pt").is_file() else "new"


MAY_DIFFER = ("--resume", "--out", "--run-name", "--data-root", "--download", "--workers", "--device", "--threads",
              "--no-progress", "--print-every", "--log-interval")
"""Flags a run may have been started with other values of (as ``--resume`` allows them to change)."""


def flag_map(argv: list[str]) -> dict[str, tuple[str, ...]]:
    """``--flag v1 v2 --switch`` -> {"--flag": ("v1", "v2"), "--switch": ()} (``--flag=v`` as ``--flag v``)."""
    flags: dict[str, tuple[str, ...]] = {}
    current = None
    for word in argv:
        if word.startswith("--"):
            current, _, value = word.partition("=")
            flags[current] = (value,) if value else ()
        elif current is not None:
            flags[current] += (word,)
    return flags


def conflict(job: Job, opts) -> str | None:
    """Why the run directory holds another experiment than the plan's (its latest recorded command
    differs in a flag that defines the run), or None."""
    run_dir = job.run_dir(opts.out)
    try:
        recorded = json.loads((run_dir / "results.json").read_text())["invocations"][-1]["command"][1:]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None  # nothing recorded yet (or by an older version): nothing to compare
    had, plan = flag_map(recorded), flag_map(command(job, opts, resume=False)[1:])
    differ = [f"{flag} {' '.join(had[flag]) if flag in had else '(not given)'} -> "
              f"{' '.join(plan[flag]) if flag in plan else '(not given)'}"
              for flag in dict.fromkeys([*had, *plan]) if flag not in MAY_DIFFER and had.get(flag) != plan.get(flag)]
    if not differ:
        return None
    return (f"{run_dir} holds a run made with other flags than the plan's ({'; '.join(differ)}); "
            "move it away or give the script another --out")


def todo(phase: list[Job], opts, failures: list) -> list[Job]:
    """The runs of a phase to start or resume: not finished, and not a different run under the same name
    (reported as failed, with what differs; never skipped as finished nor resumed)."""
    jobs = []
    for job in phase:
        problem = conflict(job, opts)
        if problem:
            failures.append((job, "other flags", None))
            print(f"[{time.strftime('%H:%M:%S')}] FAILED {job.experiment}/{job.method}/{job.name}: {problem}",
                  flush=True)
        elif status(job, opts.out) != "finished":
            jobs.append(job)
    return jobs


# --------------------------------------------------------------------------- GPU slots

def visible_gpus() -> list[str]:
    """GPU ids to use when none are given: CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].replace(",", " ").split() if g != "-1"]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def make_slots(gpus: list[str], per_run: int) -> list[list[str] | None]:
    """Groups of ``per_run`` GPUs, one run each; [None] (one run at a time, no GPU pinning) without GPUs."""
    if not gpus:
        return [None]
    if per_run > len(gpus):
        raise PlanError(f"--gpus-per-run {per_run} needs at least {per_run} GPUs, got {' '.join(gpus)}")
    return [gpus[i:i + per_run] for i in range(0, len(gpus) - per_run + 1, per_run)]


def die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGTERM if this launcher dies, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG; torchrun passes SIGTERM on to its workers)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: the run directory's lock still prevents a second run beside an orphan
        pass


def launcher(slot: list[str] | None) -> list[str]:
    """The interpreter (and torchrun for a slot of several GPUs)."""
    if slot and len(slot) > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(slot)}"]
    return [sys.executable]


# --------------------------------------------------------------------------- running

def run_in_process(cmd: list[str], log: Path) -> int:
    """``python cmd...`` inside this process: the script runs as ``__main__`` with ``sys.argv = cmd``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    saved_argv = sys.argv
    with open(log, "a") as f, redirect_stdout(f), redirect_stderr(f):
        sys.argv = cmd
        try:
            runpy.run_path(cmd[0], run_name="__main__")
            return 0
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # a crash of the training script: its traceback goes to its log
            traceback.print_exc()
            return 1
        finally:
            sys.argv = saved_argv


def held_by(run_dir: Path) -> str | None:
    """Who holds the run directory's lock (another process training it: utils.RunDirectory), or None.

    Read from /proc/locks where there is one (looking never disturbs a process taking the lock),
    else by trying the lock for an instant."""
    lock = run_dir / ".lock"
    try:
        st = lock.stat()
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"  # as /proc/locks writes it
        holder = lock.read_text().strip() or "another process"
    except OSError:  # no lock file: nobody trains there
        return None
    try:
        table = Path("/proc/locks").read_text().split("\n")
    except OSError:
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return holder
        return None
    return holder if any(line.split()[1:2] == ["FLOCK"] and line.split()[5] == key
                         for line in table if len(line.split()) > 5) else None


def next_job(pending: list, opts, waiting: set):
    """The first pending job no other process holds (removed from ``pending``), or None. A held run
    is waited for (said once); one that its holder finished meanwhile is dropped."""
    for job in list(pending):
        holder = held_by(job.run_dir(opts.out))
        if holder:
            if id(job) not in waiting:
                waiting.add(id(job))
                print(f"[{time.strftime('%H:%M:%S')}] wait  {job.experiment}/{job.method}/{job.name}: in use by "
                      f"{holder}", flush=True)
            continue
        pending.remove(job)
        if status(job, opts.out) == "finished":  # finished by the process we waited for
            print(f"[{time.strftime('%H:%M:%S')}] done  {job.experiment}/{job.method}/{job.name} "
                  "(by another process)", flush=True)
            continue
        return job
    return None


def run_phase(jobs, opts, slots, failures) -> None:
    """Run one phase's jobs, at most one per slot at a time; a run another process trains is waited for."""
    pending, waiting = list(jobs), set()
    running: dict[int, tuple] = {}  # slot index -> (process, job, log file)
    try:
        while pending or running:
            for index, slot in enumerate(slots):
                if index in running or not pending:
                    continue
                job = next_job(pending, opts, waiting)
                if job is None:
                    break
                cmd, log = start(job, opts, slot)
                if opts.in_process:
                    code = run_in_process(cmd, log)
                    if code == 130:  # main_guard's answer to Ctrl-C
                        raise KeyboardInterrupt
                    report(job, code, log, failures)
                    continue
                env = dict(os.environ)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
                handle = open(log, "a")
                process = subprocess.Popen(launcher(slot) + cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=die_with_parent)
                running[index] = (process, job, handle)
            for index, (process, job, handle) in list(running.items()):
                if process.poll() is not None:
                    handle.close()
                    report(job, process.returncode, Path(handle.name), failures)
                    del running[index]
            if running or pending:
                time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the runs as Ctrl-C would (they keep their last epoch)
        for process, _, _ in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process, _, _ in running.values():
            process.wait()
        raise


def start(job: Job, opts, slot):
    state = status(job, opts.out)
    cmd = command(job, opts, resume=state == "interrupted")
    log = job.log(opts.out)
    log.parent.mkdir(parents=True, exist_ok=True)
    where = f"GPU {','.join(slot)}" if slot else "CPU" if opts.in_process else "default device"
    verb = "resume" if state == "interrupted" else "start"
    print(f"[{time.strftime('%H:%M:%S')}] {verb} {job.experiment}/{job.method}/{job.name} ({where})", flush=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(['python', *cmd])}\n")
    return cmd, log


def report(job: Job, code: int | str, log: Path, failures: list) -> None:
    """Print how a run ended (``code``: its exit status, or why its Slurm job failed) and collect failures."""
    if code == 0:
        print(f"[{time.strftime('%H:%M:%S')}] done  {job.experiment}/{job.method}/{job.name}", flush=True)
    else:
        failures.append((job, code, log))
        print(f"[{time.strftime('%H:%M:%S')}] FAILED {job.experiment}/{job.method}/{job.name} "
              f"({exit_text(code)}); see {log}", flush=True)


def exit_text(code: int | str) -> str:
    return code if isinstance(code, str) else f"exit {code}"


def dry_run(phases, opts, slots) -> None:
    """Print what would run (finished runs as comments), in order, phase by phase."""
    for number, phase in enumerate(phases):
        if number:
            print("# --- wait for the runs above")
        for i, job in enumerate(phase):
            state, problem = status(job, opts.out), conflict(job, opts)
            if problem:
                print(f"# not run: {problem}")
                continue
            if state == "finished":
                print(f"# finished, skipped: {job.run_dir(opts.out)}")
                continue
            slot = slots[i % len(slots)]
            prefix = f"CUDA_VISIBLE_DEVICES={','.join(slot)} " if slot else ""
            argv = ["python", *launcher(slot)[1:], *command(job, opts, resume=state == "interrupted")]
            print(prefix + shlex.join(argv))


# --------------------------------------------------------------------------- main

def interrupt(signum, frame):
    """SIGTERM: handled as Ctrl-C."""
    raise KeyboardInterrupt

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan", type=Path, help="plan file written by scripts/common.sh")
    p.add_argument("--out", type=Path, default=Path("runs"), help="output root (runs go to <out>/<experiment>/)")
    p.add_argument("--data-root", help="--data-root of every run")
    p.add_argument("--gpus", help="GPU ids, e.g. '0 1' or '0,1' (an id twice: two runs on it); "
                                  "default: CUDA_VISIBLE_DEVICES or every GPU nvidia-smi lists")
    p.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per run (several: torchrun, DDP)")
    p.add_argument("--epochs", type=int, help="--epochs of every run (default: each recipe's)")
    p.add_argument("--smoke", action="store_true", help="tiny runs on the same code path (see above)")
    p.add_argument("--in-process", action="store_true", help="run the commands inside this process, in turn")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    g = p.add_argument_group("Slurm (scripts/slurm_backend.py)")
    g.add_argument("--slurm", action="store_true", help="submit every run as a Slurm job, through submitit")
    g.add_argument("--slurm-local", action="store_true",
                   help="the same jobs through submitit's local executor, on this machine (implies --slurm)")
    g.add_argument("--partition", help="the jobs' Slurm partition")
    g.add_argument("--time", default="1440", help="time limit of a job: minutes, HH:MM:SS or D-HH:MM:SS; "
                                                 "a job that reaches it is requeued and resumes (default: 24 h)")
    g.add_argument("--account", help="the Slurm account to charge")
    g.add_argument("--sbatch", metavar="FLAGS", help="more sbatch flags, e.g. '--qos=high --cpus-per-task=8'")
    p.usage = "%(prog)s plan [options] [-- flags added to every run]"
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, as every tool here
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = p.parse_args(argv[:len(argv) - len(extra) - ("--" in argv)])
    opts.extra = extra
    if opts.gpus_per_run < 1:
        p.error(f"--gpus-per-run must be >= 1, got {opts.gpus_per_run}")
    if opts.epochs is not None and opts.epochs < 1:
        p.error(f"--epochs must be >= 1, got {opts.epochs}")
    opts.slurm = opts.slurm or opts.slurm_local
    if opts.slurm:
        import slurm_backend
        opts.out = opts.out.absolute()  # the jobs need not start where this launcher did
        if opts.gpus is not None:
            p.error("--gpus names GPUs of this machine; with --slurm, Slurm allocates them (--gpus-per-run)")
        if opts.in_process:
            p.error("--in-process and --slurm exclude each other")
        try:
            opts.time = slurm_backend.minutes(opts.time)
            slurm_backend.sbatch_flags(opts.sbatch)
        except slurm_backend.SlurmError as e:
            p.error(str(e))
    elif any(getattr(opts, k) is not None for k in ("partition", "account", "sbatch")):
        p.error("--partition, --account and --sbatch need --slurm")
    return opts


def slurm(phases, opts) -> int:
    """The plan through the Slurm back end (scripts/slurm_backend.py)."""
    import slurm_backend
    if slurm_backend.submitit is None:
        print("launch.py: error: --slurm needs submitit (pip install submitit)", file=sys.stderr)
        return 2
    if opts.dry_run:
        slurm_backend.dry_run(phases, opts, sys.modules[__name__])
        return 0
    if opts.smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGTERM, interrupt)
    return slurm_backend.run(phases, opts, sys.modules[__name__])


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        phases = read_plan(opts.plan.read_text())
        if not opts.slurm:
            gpus = opts.gpus.replace(",", " ").split() if opts.gpus is not None else visible_gpus()
            slots = [None] if opts.smoke or opts.in_process else make_slots(gpus, opts.gpus_per_run)
    except (PlanError, OSError) as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    if opts.slurm:
        return slurm(phases, opts)
    if opts.dry_run:
        dry_run(phases, opts, slots)
        return 0
    if opts.smoke:  # one thread: tiny convolutions gain nothing from more, and lose a lot on a busy machine
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGTERM, interrupt)
    failures: list = []
    remaining = sum(status(job, opts.out) != "finished" for phase in phases for job in phase)
    total = sum(len(phase) for phase in phases)
    print(f"{total} runs, {total - remaining} finished already; {len(slots)} at a time", flush=True)
    try:
        for phase in phases:
            run_phase(todo(phase, opts, failures), opts, slots, failures)
    except KeyboardInterrupt:
        print("interrupted; run the script again to resume", file=sys.stderr)
        return 130
    for job, code, log in failures:
        print(f"failed ({exit_text(code)}): {job.run_dir(opts.out)}" + (f"  log: {log}" if log else ""),
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)

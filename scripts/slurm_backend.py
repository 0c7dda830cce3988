"""The Slurm back end of scripts/launch.py (``--slurm``): every run one Slurm job, through submitit.

The plan's semantics stay those of the local launcher:

* a phase (the runs between two barriers) is submitted as one job array, one job per
  run that is not finished yet; the launcher waits for the phase's jobs before it
  submits the next phase (e.g. KD after its teacher), reports each run as it ends, and
  lists the failed ones with their logs at the end (exit 1);
* a job decides when it starts, not when it is submitted: a finished run (results.json)
  ends at once, an interrupted one (last.pt) continues with ``--resume``, another is
  started. A job that reaches its time limit or is preempted is requeued by submitit
  (:class:`TrainingJob` is ``Checkpointable``): it first stops its training with Ctrl-C
  (SIGINT; the last completed epoch is kept in last.pt) and the requeued job resumes from
  there. Before starting, a job waits until no process holds the run directory's lock
  (:func:`wait_for_lock`), so that it never runs beside a previous instance of itself;
* each job's training output goes to the run's log, as locally
  (``<out>/<experiment>/logs/<method>-<run-name>.log``); submitit's own files (sbatch
  script, job stdout/stderr, pickles) to ``<out>/<experiment>/logs/slurm/``, where
  ``<method>-<run-name>.job`` also records the job id. Run the script again after the
  launcher was stopped: it waits for jobs still queued or running instead of submitting
  their runs twice, skips finished runs and resubmits the others;
* ``--dry-run`` prints, per phase, the sbatch header submitit would write and the
  command of every job.

``--slurm-local`` runs the same jobs through submitit's local executor (each job a
process on this machine, no GPU requested in smoke mode): the test suite's way of running
this back end without a cluster.
"""
from __future__ import annotations

import fcntl
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import cloudpickle
    import submitit
except ImportError:  # reported by launch.py as one line
    submitit = None
else:  # a job unpickles TrainingJob without importing this file (not on the job's sys.path)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAX_REQUEUES = 100
"""Requeues after reaching the time limit, per job (submitit's ``max_num_timeout``): a long run on a
cluster with a short limit goes through many (preemptions are not counted)."""
SIGNAL_DELAY_S = 120
"""Slurm warns a job this long before its time limit (``--signal USR2@120``): time to stop and requeue."""
STOP_WAIT_S = 60
"""How long a stopping job waits for its training to end after Ctrl-C before it kills it."""
LOCK_WAIT_S = 600
"""How long a starting job waits for another process to release the run directory."""
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
"""Slurm job states of a job that will still run (or is running): such a job is waited for, not resubmitted."""


class SlurmError(Exception):
    """A bad Slurm option or no Slurm here; reported as one line, exit status 2."""


# --------------------------------------------------------------------------- the job

def _child_signals() -> None:
    """In the training process, before exec: Slurm's time-limit warning (SIGUSR2, sent to every process
    of the job) is for submitit; the training is stopped by :meth:`TrainingJob.stop`'s Ctrl-C, which it
    must not inherit as ignored (as a background job of a shell would)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_lock(run_dir: Path, patience_s: float = LOCK_WAIT_S, poll_s: float = 5.0) -> bool:
    """Wait until no process holds ``run_dir``'s lock (utils.RunDirectory), at most ``patience_s``.

    True when it is free (or the run has none yet). After that the training script decides:
    it refuses, with one line, a run directory still in use.
    """
    lock = run_dir / ".lock"
    if not lock.is_file():
        return True
    deadline = time.monotonic() + patience_s
    with open(lock, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                handle.seek(0)
                print(f"waiting for {handle.read().strip() or 'another process'} to release {run_dir}", flush=True)
                time.sleep(poll_s)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True


class TrainingJob(submitit.helpers.Checkpointable if submitit else object):
    """One run as a submitit job: ``launcher + command`` (plus ``--resume`` when the run directory
    holds last.pt), its output appended to ``log``; returns the training's exit status."""

    def __init__(self, launcher: list[str], command: list[str], run_dir, log, lock_wait_s: float = LOCK_WAIT_S):
        self.launcher, self.command = list(launcher), list(command)
        self.run_dir, self.log, self.lock_wait_s = str(run_dir), str(log), lock_wait_s
        self._process = None

    def __call__(self) -> int:
        run_dir, log = Path(self.run_dir), Path(self.log)
        if (run_dir / "results.json").is_file():
            print(f"finished already: {run_dir}", flush=True)
            return 0
        wait_for_lock(run_dir, self.lock_wait_s)
        cmd = self.command + (["--resume"] if (run_dir / "last.pt").is_file() else [])
        log.parent.mkdir(parents=True, exist_ok=True)
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "?"
        print(f"$ {shlex.join(['python', *cmd])}", flush=True)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(['python', *cmd])}    # job {job} on {os.uname().nodename}\n")
            f.flush()
            self._process = subprocess.Popen(self.launcher + cmd, stdout=f, stderr=subprocess.STDOUT,
                                             preexec_fn=_child_signals)
            code = self._process.wait()
        self._process = None
        print(f"exit status {code}", flush=True)
        return code

    def stop(self) -> None:
        """Stop the training as Ctrl-C would (it keeps its last completed epoch in last.pt)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        # Called from submitit's signal handler, while __call__ is inside process.wait(), which holds the
        # Popen's lock: wait on the pid itself.
        deadline = time.monotonic() + STOP_WAIT_S
        try:
            while not os.waitpid(process.pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    process.kill()
                    os.waitpid(process.pid, 0)
                    break
                time.sleep(0.2)
        except ChildProcessError:  # reaped already
            pass

    def checkpoint(self) -> "submitit.helpers.DelayedSubmission":
        """Time limit or preemption: stop the training, then requeue this job; it resumes from last.pt."""
        self.stop()
        return submitit.helpers.DelayedSubmission(self)

    def __getstate__(self):
        return {**self.__dict__, "_process": None}


# --------------------------------------------------------------------------- options

def minutes(text: str) -> int:
    """A Slurm time limit in minutes: ``MINUTES``, ``HH:MM:SS`` or ``D-HH:MM[:SS]``."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise SlurmError(f"--time: expected minutes, HH:MM:SS or D-HH:MM:SS, got {text!r}")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if second is None and days is None:
        total = first
    elif third is None and days is None:  # MM:SS, as sbatch reads it
        total = first + (second > 0)
    else:
        total = (days or 0) * 1440 + first * 60 + (second or 0) + ((third or 0) > 0)
    if total < 1:
        raise SlurmError(f"--time must be at least one minute, got {text!r}")
    return total


def sbatch_flags(text: str | None) -> dict:
    """``"--qos=high --exclusive --mem 64G"`` -> {"qos": "high", "exclusive": True, "mem": "64G"}."""
    flags, words = {}, shlex.split(text or "")
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) < 3:
            raise SlurmError(f"--sbatch: expected long sbatch flags (--name=value), got {word!r}")
        key, eq, value = word[2:].partition("=")
        if not eq:
            if i + 1 < len(words) and not words[i + 1].startswith("-"):
                value, i = words[i + 1], i + 1
            else:
                value = True
        flags[key.replace("-", "_")] = value
        i += 1
    return flags


CPUS_PER_GPU = 8
"""CPU cores a job asks for per GPU unless ``--sbatch`` says ``--cpus-per-task``: the data loader's
workers (4 by default) and the training process, with room for a disk-backed set's decoding."""


def parameters(opts, jobs: list) -> dict:
    """The sbatch parameters of a phase, by submitit's names (``SlurmExecutor.update_parameters``)."""
    experiments = sorted({job.experiment for job in jobs})
    extra = sbatch_flags(opts.sbatch)
    params = {"job_name": "-".join(experiments) if len(jobs) > 1 else f"{jobs[0].experiment}-{jobs[0].name}",
              "time": opts.time, "nodes": 1, "ntasks_per_node": 1, "signal_delay_s": SIGNAL_DELAY_S,
              "partition": opts.partition, "account": opts.account,
              "gpus_per_node": None if opts.smoke else opts.gpus_per_run,
              "cpus_per_task": None if "cpus_per_task" in extra else 1 if opts.smoke else
              CPUS_PER_GPU * opts.gpus_per_run,
              "additional_parameters": extra or None}
    return {k: v for k, v in params.items() if v is not None}


def folder(opts, jobs: list) -> Path:
    """submitit's folder of a phase's jobs: one folder per Slurm job (``%j``: the job id); the local
    executor's files (named by job id) all in one."""
    root = opts.out / jobs[0].experiment / "logs" / "slurm"
    return root if opts.slurm_local else root / "%j"


def make_executor(opts, jobs: list):
    """A SlurmExecutor (or with ``--slurm-local`` a LocalExecutor) for the phase ``jobs``."""
    params = parameters(opts, jobs)
    if opts.slurm_local:
        executor = submitit.LocalExecutor(folder(opts, jobs), max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(timeout_min=params["time"], gpus_per_node=params.get("gpus_per_node", 0),
                                   tasks_per_node=1, nodes=1, signal_delay_s=SIGNAL_DELAY_S)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder(opts, jobs), max_num_timeout=MAX_REQUEUES)
    except RuntimeError as e:  # no srun: not on a Slurm cluster
        raise SlurmError(f"--slurm: {e} (--slurm-local runs the jobs here, --dry-run shows them)") from None
    try:
        executor.update_parameters(**params)
    except ValueError as e:
        raise SlurmError(f"--sbatch: {str(e).splitlines()[0]}") from None
    return executor


# --------------------------------------------------------------------------- running

def job_file(job, out: Path) -> Path:
    """Where the id of the run's latest job is recorded."""
    return out / job.experiment / "logs" / "slurm" / f"{job.method}-{job.name}.job"


def slurm_state(job_id: str, job_folder: str) -> str:
    """The Slurm state of a recorded job (sacct, through submitit), e.g. RUNNING; UNKNOWN if none."""
    try:
        return submitit.SlurmJob(job_folder, job_id).state.split()[0]
    except Exception:  # sacct missing or failing: treat as not known
        return "UNKNOWN"


def queued(job, opts):
    """The submitit job of a run still queued or running from an earlier launch (Slurm only), or None."""
    record = job_file(job, opts.out)
    if opts.slurm_local or not record.is_file():
        return None
    job_id, _, job_folder = record.read_text().strip().partition(" ")
    if job_id and job_folder and slurm_state(job_id, job_folder) in ACTIVE:
        return submitit.SlurmJob(job_folder, job_id)
    return None


def outcome(handle) -> int | str:
    """A finished job's training exit status, or why the job itself failed."""
    try:
        return handle.result()
    except Exception as e:  # the job failed, was cancelled or killed (submitit raises several types)
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        return f"job {handle.job_id} failed: {lines[-1] if lines else type(e).__name__} (see {handle.paths.stderr})"


def submit_phase(jobs: list, opts, launch) -> list[tuple]:
    """Submit the phase's runs (attaching to those still queued from an earlier launch); [(job, handle)]."""
    handles, todo = [], []
    for job in jobs:
        earlier = queued(job, opts)
        if earlier is not None:
            handles.append((job, earlier))
            print(f"[{time.strftime('%H:%M:%S')}] queued already as job {earlier.job_id}: "
                  f"{job.experiment}/{job.method}/{job.name}", flush=True)
        else:
            todo.append(job)
    if not todo:
        return handles
    executor = make_executor(opts, todo)
    with executor.batch():
        submitted = [executor.submit(training_job(job, opts, launch)) for job in todo]
    for job, handle in zip(todo, submitted):
        record = job_file(job, opts.out)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{handle.job_id} {folder(opts, todo)}\n")
        job.log(opts.out).parent.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] submitted {job.experiment}/{job.method}/{job.name} "
              f"as job {handle.job_id}", flush=True)
        handles.append((job, handle))
    return handles


def training_job(job, opts, launch) -> TrainingJob:
    slot = None if opts.smoke else [str(i) for i in range(opts.gpus_per_run)]
    return TrainingJob(launch.launcher(slot), launch.command(job, opts, resume=False), job.run_dir(opts.out),
                       job.log(opts.out))


def wait(handles: list[tuple], opts, launch, failures: list, poll_s: float) -> None:
    """Report each job as it ends; return when all have."""
    pending = list(handles)
    while pending:
        for job, handle in list(pending):
            if handle.done():
                launch.report(job, outcome(handle), job.log(opts.out), failures)
                pending.remove((job, handle))
        if pending:
            time.sleep(poll_s)


def run(phases: list[list], opts, launch) -> int:
    """Submit the plan phase by phase and wait for it; the exit status of launch.py."""
    failures: list = []
    handles: list[tuple] = []
    todo = sum(launch.status(job, opts.out) != "finished" for phase in phases for job in phase)
    total = sum(len(phase) for phase in phases)
    where = "submitit's local executor" if opts.slurm_local else "Slurm"
    print(f"{total} runs, {total - todo} finished already; one job each through {where}", flush=True)
    try:
        for phase in phases:
            jobs = launch.todo(phase, opts, failures)
            if jobs:
                handles = submit_phase(jobs, opts, launch)
                wait(handles, opts, launch, failures, poll_s=1.0 if opts.slurm_local else 30.0)
    except SlurmError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        running = [handle for _, handle in handles if not handle.done()]
        if opts.slurm_local:
            for handle in running:
                handle.cancel()
            print("interrupted; the jobs were stopped; run the script again to resume", file=sys.stderr)
        else:
            ids = " ".join(handle.job_id for handle in running)
            print(f"interrupted; the submitted jobs keep running ({ids or 'none left'}): `scancel` stops them; "
                  "run the script again to wait for them and go on", file=sys.stderr)
        return 130
    for job, code, log in failures:
        print(f"failed ({code if isinstance(code, str) else f'exit {code}'}): {job.run_dir(opts.out)}  log: {log}",
              file=sys.stderr)
    return 1 if failures else 0


def dry_run(phases: list[list], opts, launch) -> None:
    """Print what would be submitted: per phase the sbatch header and the command of each job."""
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor writes (needs no cluster)
    for number, phase in enumerate(phases):
        if number:
            print("# --- wait for the jobs above")
        jobs = []
        for job in phase:
            if launch.status(job, opts.out) == "finished":
                print(f"# finished, skipped: {job.run_dir(opts.out)}")
            else:
                jobs.append(job)
        if not jobs:
            continue
        params = parameters(opts, jobs)
        header = _make_sbatch_string(command="", folder=folder(opts, jobs), map_count=len(jobs) if len(jobs) > 1
                                     else None, **params)
        kind = f"a job array of {len(jobs)} jobs" if len(jobs) > 1 else "one job"
        print(f"# phase {number + 1}: {kind}, submitted by submitit with:")
        for line in header.splitlines():
            if line.startswith("#SBATCH"):
                print(line)
        for i, job in enumerate(jobs):
            resume = launch.status(job, opts.out) == "interrupted"
            argv = ["python", *training_job(job, opts, launch).launcher[1:], *launch.command(job, opts, resume)]
            print(f"# job {i}: {job.experiment}/{job.method}/{job.name}")
            print(shlex.join(argv))

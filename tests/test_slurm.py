"""The Slurm back end (scripts/slurm_backend.py, launch.py --slurm): the dry run of a table script,
bad options, a table script's smoke mode through submitit's local executor (barrier, skip, resume),
a job requeued at its time limit that resumes, waiting for a run directory's lock, and attaching to
jobs still queued from an earlier launch. No cluster needed."""
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import launch  # noqa: E402
import slurm_backend  # noqa: E402

submitit = pytest.importorskip("submitit")


def bash(script, *args, env=None):
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_slurm_dry_run_prints_the_jobs_it_would_submit(tmp_path):
    done = bash("table4_comparison.sh", "--slurm", "--dry-run", "--seeds", "0", "--out", str(tmp_path / "runs"),
                "--partition", "gpu", "--time", "2-00:00:00", "--account", "lab", "--gpus-per-run", "2",
                "--sbatch", "--qos=high --cpus-per-task 8 --exclusive", "--", "--amp")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "# phase 1: a job array of 20 jobs, submitted by submitit with:"
    for flag in ("--array=0-19%20", "--partition=gpu", "--time=2880", "--account=lab", "--gpus-per-node=2",
                 "--ntasks-per-node=1", "--qos=high", "--cpus-per-task=8", "--exclusive", "--signal=USR2@120",
                 f"--output={tmp_path}/runs/table4/logs/slurm/%A_%a/%A_%a_0_log.out"):
        assert f"#SBATCH {flag}" in lines, flag
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 20 and "# job 19: table4/switokd/cifar100-mobilenetv2_0.5-wrn_16_2-seed0" in lines
    assert all(c.startswith("python -m torch.distributed.run --standalone --nproc_per_node=2 ") for c in commands)
    assert all(c.count("--amp") == 1 and "--resume" not in c for c in commands)
    assert not (tmp_path / "runs").exists()


def test_slurm_dry_run_waits_at_barriers_and_resumes(tmp_path):
    teacher = tmp_path / "table5" / "vanilla" / "cifar100-wrn_40_2-seed0"
    teacher.mkdir(parents=True)
    (teacher / "last.pt").write_bytes(b"")
    done = bash("table5_offline_kd.sh", "--slurm", "--dry-run", "--seeds", "0", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    wait = lines.index("# --- wait for the jobs above")
    assert "#SBATCH --array=0-2%3" in lines[:wait] and "#SBATCH --gpus-per-node=1" in lines
    assert lines[wait + 1] == "# phase 2: a job array of 5 jobs, submitted by submitit with:"
    assert "#SBATCH --array=0-4%5" in lines[wait:] and "# job 4: table5/rco/cifar100-wrn_16_2-wrn_40_2-seed0" in lines
    commands = [line for line in lines if not line.startswith("#")]
    assert [c.endswith("--resume") for c in commands] == [True] + [False] * 7
    assert "train_kd.py" in commands[-1]


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition needs --slurm"),
    (["--slurm", "--time", "soon"], "--time: expected minutes, HH:MM:SS or D-HH:MM:SS, got 'soon'"),
    (["--slurm", "--sbatch", "-p gpu"], "--sbatch: expected long sbatch flags"),
    (["--slurm", "--gpus", "0 1"], "with --slurm, use --gpus-per-run"),
    (["--slurm", "--sbatch"], "--sbatch needs a value"),
])
def test_bad_slurm_options_fail_with_one_line(args, message):
    done = bash("table3_temperature.sh", "--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


def test_table6_asks_for_a_gpu_count_and_no_slurm_is_one_line(tmp_path):
    done = bash("table6_imagenet.sh", "--slurm", "--dry-run")
    assert done.returncode == 2 and "--gpus-per-run N" in done.stderr
    if not any((Path(p) / "srun").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        done = bash("table6_imagenet.sh", "--slurm", "--gpus-per-run", "8", "--out", str(tmp_path))
        assert done.returncode == 2 and done.stderr.startswith("launch.py: error: --slurm: Could not detect")
        assert len(done.stderr.splitlines()) == 1


def test_time_limits_and_sbatch_flags():
    assert [slurm_backend.minutes(t) for t in ("90", "30:00", "24:00:00", "1-00:00:00", "2-12", "1-12:30",
                                                "0:00:30")] == [90, 30, 1440, 1440, 3600, 2190, 1]
    with pytest.raises(slurm_backend.SlurmError):
        slurm_backend.minutes("0")
    assert slurm_backend.sbatch_flags("--qos=high --mem 64G --exclusive --mail-type=END") == {
        "qos": "high", "mem": "64G", "exclusive": True, "mail_type": "END"}


def test_table_script_through_submitit_local_executor(tmp_path):
    """table5 in smoke mode as submitit jobs: KD after the barrier; again: skip finished, resume one."""
    out = tmp_path / "runs"
    done = bash("table5_offline_kd.sh", "--smoke", "--slurm-local", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "8 runs, 0 finished already; one job each through submitit's local executor"
    kd = next(i for i, line in enumerate(lines) if "submitted table5/kd/" in line)
    assert sum("] done  table5/" in line for line in lines[:kd]) == 3  # the barrier: KD after its teacher
    assert len(list(out.rglob("results.json"))) == 8
    kd_run = out / "table5" / "kd" / "cifar100-wrn_16_2-wrn_40_2-seed0"
    job_id = (out / "table5" / "logs" / "slurm" / "kd-cifar100-wrn_16_2-wrn_40_2-seed0.job").read_text().split()[0]
    assert (out / "table5" / "logs" / "slurm" / f"{job_id}_0_log.out").is_file()  # submitit's logs

    (kd_run / "results.json").unlink()  # interrupted after its last epoch: last.pt, no results.json
    done = bash("table5_offline_kd.sh", "--smoke", "--slurm-local", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[0].startswith("8 runs, 7 finished already")
    assert sum("submitted" in line for line in done.stdout.splitlines()) == 1
    log = (out / "table5" / "logs" / "kd-cifar100-wrn_16_2-wrn_40_2-seed0.log").read_text()
    commands = [line for line in log.splitlines() if line.startswith("$ python")]
    assert len(commands) == 2 and "--resume" not in commands[0] and "--resume    # job" in commands[1]
    assert json.loads((kd_run / "results.json").read_text())["epochs"] == 1


FAKE_TRAINER = """
import json, sys, time
from pathlib import Path
run = Path(sys.argv[1])
with open(run.parent / "calls.jsonl", "a") as f:
    f.write(json.dumps({"resume": "--resume" in sys.argv}) + "\\n")
if "--resume" in sys.argv:
    (run / "results.json").write_text("{}")
    sys.exit(0)
run.mkdir(exist_ok=True)
(run / "last.pt").write_bytes(b"epoch 1")
try:
    time.sleep(300)
except KeyboardInterrupt:  # what the training scripts do on Ctrl-C: keep last.pt, exit 130
    with open(run.parent / "calls.jsonl", "a") as f:
        f.write(json.dumps({"stopped": True}) + "\\n")
    sys.exit(130)
"""


def test_a_job_at_its_time_limit_is_requeued_and_resumes(tmp_path):
    """submitit's local executor sends the time-limit signal 10 s after the start (60 s limit, 50 s warning):
    the job stops its training with Ctrl-C, is requeued, and the new instance adds --resume."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINER)
    run_dir = tmp_path / "run"
    executor = submitit.LocalExecutor(tmp_path / "slurm", max_num_timeout=3)
    executor.update_parameters(timeout_min=1, signal_delay_s=50)
    job = executor.submit(slurm_backend.TrainingJob([sys.executable], [str(fake), str(run_dir)], run_dir,
                                                    tmp_path / "run.log"))
    assert job.result() == 0
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls == [{"resume": False}, {"stopped": True}, {"resume": True}]
    assert (run_dir / "results.json").is_file()
    log = (tmp_path / "run.log").read_text()
    assert log.count("$ python") == 2 and log.splitlines()[-1].split("    # job")[0].endswith("--resume")


def test_a_job_waits_for_the_run_directory_lock(tmp_path):
    (tmp_path / ".lock").write_text("pid 1 on elsewhere\n")
    holder = open(tmp_path / ".lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    start = time.monotonic()
    assert not slurm_backend.wait_for_lock(tmp_path, patience_s=0.3, poll_s=0.1)
    assert time.monotonic() - start >= 0.3
    holder.close()  # the holder ends: the lock is free
    assert slurm_backend.wait_for_lock(tmp_path, patience_s=0.3, poll_s=0.1)
    assert slurm_backend.wait_for_lock(tmp_path / "new-run")


def test_runs_still_queued_are_waited_for_not_resubmitted(tmp_path, monkeypatch, capsys):
    opts = SimpleNamespace(out=tmp_path, slurm_local=False, smoke=False, gpus_per_run=1, time=60, partition=None,
                           account=None, sbatch=None, data_root=None, epochs=None, extra=[])
    job = launch.Job("exp", "a-seed0", "train_vanilla.py", ["--seed", "0"])
    record = slurm_backend.job_file(job, tmp_path)
    record.parent.mkdir(parents=True)
    record.write_text(f"123_4 {tmp_path}/exp/logs/slurm/%j\n")
    monkeypatch.setattr(slurm_backend, "slurm_state", lambda job_id, folder: "RUNNING")
    monkeypatch.setattr(slurm_backend, "make_executor", lambda *a: pytest.fail("submitted again"))
    [(found, handle)] = slurm_backend.submit_phase([job], opts, launch)
    assert found is job and handle.job_id == "123_4"
    assert "queued already as job 123_4: exp/vanilla/a-seed0" in capsys.readouterr().out
    monkeypatch.setattr(slurm_backend, "slurm_state", lambda job_id, folder: "TIMEOUT")
    assert slurm_backend.queued(job, opts) is None


def test_failed_jobs_are_reported_with_their_logs(tmp_path, capsys):
    class Handle:  # a finished submitit job
        def __init__(self, result):
            self.outcome, self.job_id = result, "7_1"
            self.paths = SimpleNamespace(stderr=tmp_path / "7_1_0_log.err")

        def done(self):
            return True

        def result(self):
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome

    jobs = [launch.Job("exp", f"{name}-seed0", "train_vanilla.py", []) for name in ("ok", "bad", "lost")]
    handles = [Handle(0), Handle(3), Handle(RuntimeError("Job 7_1 was not completed\nCANCELLED by 42"))]
    failures = []
    slurm_backend.wait(list(zip(jobs, handles)), SimpleNamespace(out=tmp_path), launch, failures, poll_s=0)
    assert [(job.name, code) for job, code, _ in failures] == [
        ("bad-seed0", 3), ("lost-seed0", f"job 7_1 failed: CANCELLED by 42 (see {tmp_path}/7_1_0_log.err)")]
    out = capsys.readouterr().out
    assert "] done  exp/vanilla/ok-seed0" in out
    assert f"FAILED exp/vanilla/bad-seed0 (exit 3); see {tmp_path}/exp/logs/vanilla-bad-seed0.log" in out

"""DistributedDataParallel: two CPU processes (torchrun, gloo) train SwitOKD and multi-network SwitOKD.

Each run goes through this file's worker (``python -m torch.distributed.run ... tests/test_distributed.py
worker ...``), which runs the training script's own ``main`` and records, for its rank, the
mode of every switching decision and the final weights, so the test can compare the ranks.
"""
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--train-subset", "64", "--test-subset", "20", "--batch-size", "16",
        "--workers", "0", "--no-progress", "--device", "cpu"]
SWITOKD = [*TINY, "--student", "resnet20", "--teacher", "wrn_16_1",
           "--fixed-delta", "0.55"]  # G of these nets at start lies near 0.45-0.75: both modes occur


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, name, script, *flags, stop_after_epoch=0):
    """``script`` on two gloo processes; returns (each rank's record, stdout)."""
    records = tmp_path / "records" / name
    records.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               __file__, "worker", script, str(records), str(stop_after_epoch),
               *flags, "--out", str(tmp_path / "runs"), "--run-name", name.split("+")[0]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(records / f"rank{rank}.pt", weights_only=False) for rank in range(2)], done.stdout


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for role in a:
        for key, value in a[role].items():
            assert torch.equal(value, b[role][key]), f"{role}.{key}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs of SwitOKD on two processes: (the ranks' records, stdout, the runs' root)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    records, stdout = torchrun(tmp_path, "switokd", "train_switokd", *SWITOKD, "--epochs", "2")
    return records, stdout, tmp_path


def test_switokd_ranks_switch_together_and_end_equal(straight):
    (rank0, rank1), stdout, tmp_path = straight
    assert rank0["world_size"] == 2 and rank1["rank"] == 1
    assert len(rank0["modes"]) == 2 * 64 // 16
    assert rank0["modes"] == rank1["modes"]
    assert True in rank0["modes"] and False in rank0["modes"]   # DDP forward without backward, then with
    assert_same_weights(rank0["models"], rank1["models"])       # parameters and BatchNorm statistics

    run_dir = tmp_path / "runs" / "switokd" / "switokd"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["iterations"] == 8   # rank 0's trace
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(list((run_dir / "tensorboard").glob("events.*"))) == 1   # one writer: rank 0's
    assert not list(run_dir.glob(".*tmp*"))
    assert stdout.count("epoch 2/2") == 1                                 # only rank 0 reports
    last = torch.load(run_dir / "last.pt", weights_only=False)
    assert_same_weights(last["models"], rank0["models"])


def test_resume_under_ddp_continues_exactly(straight, tmp_path):
    (rank0, _), _, _ = straight
    (first, _), _ = torchrun(tmp_path, "r", "train_switokd", *SWITOKD, "--epochs", "2", stop_after_epoch=1)
    resumed, _ = torchrun(tmp_path, "r+resume", "train_switokd", *SWITOKD, "--epochs", "2", "--resume")
    assert first["epoch"] == 1 and resumed[0]["epoch"] == 2
    assert first["modes"] + resumed[0]["modes"] == rank0["modes"]
    for rank in resumed:  # every rank loaded the checkpoint
        assert_same_weights(rank["models"], rank0["models"])


def test_multi_network_ranks_agree(tmp_path):
    (rank0, rank1), _ = torchrun(tmp_path, "multi", "train_multi", *TINY, "--teachers", "wrn_16_1",
                                 "--students", "resnet20", "resnet20", "--epochs", "1")
    assert len(rank0["modes"]) == 2 * 64 // 16   # two pairs, four iterations
    assert rank0["modes"] == rank1["modes"]
    assert_same_weights(rank0["models"], rank1["models"])


def test_sync_bn_on_cpu_is_refused(tmp_path, monkeypatch):
    import train_switokd
    import utils
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(utils.UsageError, match="--sync-bn needs CUDA devices"):
        train_switokd.main([*SWITOKD, "--epochs", "1", "--sync-bn", "--out", str(tmp_path)])


# --------------------------------------------------------------------------- the worker

class _Stop(Exception):
    pass


def worker(script, records, stop_after_epoch, argv):
    """Run ``script``'s main on this rank, recording the switching modes and the final weights."""
    import utils
    module = importlib.import_module(script)
    modes, decide = [], module.switch_decision

    def recording_decision(*args, **kwargs):
        decision = decide(*args, **kwargs)
        modes.append(decision[-1])
        return decision

    def record(run):
        weights = {role: {k: v.clone() for k, v in m.state_dict().items()} for role, m in run.modules.items()}
        torch.save({"rank": run.rank, "world_size": run.world_size, "epoch": run.epoch, "modes": modes,
                    "models": weights}, Path(records) / f"rank{run.rank}.pt")

    end_epoch, finish = utils.Run.end_epoch, utils.Run.finish

    def end_epoch_and_maybe_stop(self, extra=None):
        row = end_epoch(self, extra)
        if self.epoch == stop_after_epoch:
            record(self)
            raise _Stop
        return row

    def record_and_finish(self, extra=None):
        record(self)
        return finish(self, extra)

    module.switch_decision = recording_decision
    utils.Run.end_epoch, utils.Run.finish = end_epoch_and_maybe_stop, record_and_finish
    try:
        module.main(argv)
    except _Stop:
        torch.distributed.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])

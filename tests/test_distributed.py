"""DistributedDataParallel: two CPU processes (torchrun, gloo) train SwitOKD and multi-network SwitOKD.

Each run goes through this file's worker (``python -m torch.distributed.run ... tests/test_distributed.py
worker ...``), which runs the training script's own ``main`` and records, for its rank, the
modes of every iteration (from the script's ``train_step``) and the final weights, so the test
can compare the ranks.
"""
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--train-subset", "64", "--test-subset", "20", "--batch-size", "16",
        "--workers", "0", "--no-progress", "--device", "cpu"]
SWITOKD = [*TINY, "--student", "resnet20", "--teacher", "wrn_16_1", "--switch-rule", "algorithm1",
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
    assert rank0["values"] == rank1["values"]                   # the same (averaged) G, delta and distances
    assert_same_weights(rank0["models"], rank1["models"])       # parameters and BatchNorm statistics

    run_dir = tmp_path / "runs" / "switokd" / "switokd"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["iterations"] == 8   # rank 0's trace
    assert results["settings"]["world_size"] == 2 and results["invocations"][0]["world_size"] == 2
    trace = np.load(run_dir / "switching.npz")
    assert trace["expert"].astype(bool).tolist() == rank0["modes"]
    np.testing.assert_array_equal(trace["G"], np.float32([v["G"] for v in rank0["values"]]))
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
    assert first["values"] + resumed[0]["values"] == rank0["values"]
    for rank in resumed:  # every rank loaded the checkpoint
        assert_same_weights(rank["models"], rank0["models"])


def test_multi_network_ranks_agree(tmp_path):
    (rank0, rank1), _ = torchrun(tmp_path, "multi", "train_multi", *TINY, "--teachers", "wrn_16_1",
                                 "--students", "resnet20", "resnet20", "--epochs", "1")
    assert len(rank0["modes"]) == 64 // 16 and all(len(m) == 2 for m in rank0["modes"])  # 4 iterations, 2 pairs
    assert rank0["modes"] == rank1["modes"]
    assert rank0["values"] == rank1["values"]
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
    """Run ``script``'s main on this rank, recording each iteration's modes and switching
    statistics (train_switokd: the expert flag; train_multi: each pair's) and the final weights."""
    import utils
    module = importlib.import_module(script)
    modes, values, step = [], [], module.train_step

    def recording_step(*args, **kwargs):
        result = step(*args, **kwargs)
        row = result[0] if isinstance(result, tuple) else result  # train_multi: (trace row, logged values)
        if isinstance(row["expert"], list):
            modes.append([bool(e) for e in row["expert"]])
        else:
            modes.append(bool(row["expert"]))
        values.append({key: row[key] for key in ("G", "delta", "ps_y", "pt_y")})
        return result

    def record(run):
        weights = {role: {k: v.clone() for k, v in m.state_dict().items()} for role, m in run.modules.items()}
        torch.save({"rank": run.rank, "world_size": run.world_size, "epoch": run.epoch, "modes": modes,
                    "values": values, "models": weights}, Path(records) / f"rank{run.rank}.pt")

    end_epoch, finish = utils.Run.end_epoch, utils.Run.finish

    def end_epoch_and_maybe_stop(self, metrics, extra=None):
        row = end_epoch(self, metrics, extra)
        if self.epoch == stop_after_epoch:
            record(self)
            raise _Stop
        return row

    def record_and_finish(self, summary=None):
        record(self)
        return finish(self, summary)

    module.train_step = recording_step
    utils.Run.end_epoch, utils.Run.finish = end_epoch_and_maybe_stop, record_and_finish
    try:
        module.main(argv)
    except _Stop:
        torch.distributed.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])

"""The speed options of the engine on the CPU: autocast (bf16, fp16 + GradScaler), channels_last, torch.compile.

Each run trains SwitOKD for one short epoch in a forced mode (learning: both networks
learn; expert: the teacher is paused) and checks that the losses are finite and that
exactly the networks that should learn have changed.
"""
import math

import numpy as np
import pytest
import torch

import train_switokd
import utils

TINY = ["--dataset", "synthetic", "--train-subset", "16", "--test-subset", "8", "--batch-size", "8",
        "--workers", "0", "--no-progress", "--device", "cpu", "--epochs", "1",
        "--student", "wrn_10_1", "--teacher", "wrn_10_1"]
ONE_SMALL_BATCH = ["--train-subset", "4", "--test-subset", "4", "--batch-size", "4"]
MODES = {"learning": ["--no-switching"],                               # Table 2 case A: always learning mode
         "expert": ["--switch-rule", "algorithm1", "--fixed-delta", "0"]}  # G > 0: every batch in expert mode


@pytest.fixture
def initial_weights(monkeypatch):
    """Filled with each network's weights as the training loop starts."""
    weights = {}
    epochs = utils.Run.epochs

    def snapshot(self):
        weights.update({role: {k: v.clone() for k, v in module.state_dict().items()}
                        for role, module in self.modules.items()})
        return epochs(self)
    monkeypatch.setattr(utils.Run, "epochs", snapshot)
    return weights


def train(tmp_path, *flags):
    """One epoch; returns (last.pt, the switching trace)."""
    train_switokd.main([*TINY, "--out", str(tmp_path), "--run-name", "r", *flags])
    run_dir = tmp_path / "switokd" / "r"
    return torch.load(run_dir / "last.pt", weights_only=False), dict(np.load(run_dir / "switching.npz"))


def changed(before, after):
    """For each parameter (not BatchNorm statistics): did training change it?"""
    return [not torch.equal(value, after[name]) for name, value in before.items()
            if "running" not in name and "num_batches" not in name]


def check_training(mode, initial, last, trace):
    assert len(trace["expert"]) and (trace["expert"] == (mode == "expert")).all()
    for key in ("student_ce", "student_kl", "teacher_ce", "teacher_kl"):
        assert np.isfinite(trace[key]).all(), key
    for role, weights in last["models"].items():
        assert all(torch.isfinite(v.float()).all() for v in weights.values()), role
    assert all(changed(initial["student"], last["models"]["student"]))
    teacher = changed(initial["teacher"], last["models"]["teacher"])
    assert all(teacher) if mode == "learning" else not any(teacher)


@pytest.mark.parametrize("mode", ["learning", "expert"])
def test_bf16_channels_last(tmp_path, initial_weights, mode):
    last, trace = train(tmp_path, "--amp", "bf16", "--channels-last", *MODES[mode])
    check_training(mode, initial_weights, last, trace)
    convolutions = [v for v in last["models"]["student"].values() if v.dim() == 4]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    assert last["scaler"] == {}   # no GradScaler for bf16


@pytest.mark.parametrize("mode", ["learning", "expert"])
def test_fp16_with_grad_scaler(tmp_path, initial_weights, mode):
    last, trace = train(tmp_path, "--amp", "fp16", *ONE_SMALL_BATCH, *MODES[mode])  # slow kernels on CPU
    check_training(mode, initial_weights, last, trace)
    scale = last["scaler"]["scale"]
    assert math.isfinite(scale) and 0 < scale <= 2.0 ** 16


@pytest.mark.parametrize("mode", ["learning", "expert"])
def test_compile_aot_eager(tmp_path, initial_weights, mode):
    """Dynamo capture and AOTAutograd of both networks, with eager kernels (no C++ build)."""
    last, trace = train(tmp_path, "--compile", "aot_eager", *MODES[mode])
    check_training(mode, initial_weights, last, trace)


def test_compile_inductor_tiniest_pair(tmp_path, initial_weights):
    """The default backend (inductor builds C++ kernels with the system compiler): one small batch."""
    last, trace = train(tmp_path, "--compile", *ONE_SMALL_BATCH, *MODES["learning"])
    assert trace["expert"].tolist() == [False]
    assert all(changed(initial_weights["student"], last["models"]["student"]))
    assert all(changed(initial_weights["teacher"], last["models"]["teacher"]))
    assert np.isfinite(trace["student_ce"]).all() and np.isfinite(trace["teacher_ce"]).all()


def test_benchmark_times_the_scripts_own_steps(tmp_path, monkeypatch):
    """scripts/benchmark.py in a tiny configuration: its SwitOKD, DML and KDCL rows call the scripts'
    train_step (counted here), and the JSON holds every row with its ratio to the bare compute."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import benchmark
    import train_dml
    import train_kdcl
    calls = {}
    for module in (train_switokd, train_dml, train_kdcl):
        real = module.train_step

        def counting(*args, __real=real, __name=module.__name__, **kwargs):
            calls[__name] = calls.get(__name, 0) + 1
            return __real(*args, **kwargs)
        monkeypatch.setattr(module, "train_step", counting)
    out = tmp_path / "bench.json"
    benchmark.main(["--student", "wrn_10_1", "--teacher", "wrn_10_1", "--batch-size", "8", "--classes", "10",
                    "--iters", "1", "--repeats", "1", "--warmup", "0", "--amp-modes", "fp32", "--only", "a", "b", "c",
                    "--device", "cpu", "--json", str(out)])
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert {"bare compute", "switokd learning", "switokd expert", "dml", "kdcl (2 views)"} <= rows.keys()
    assert rows["bare compute"]["x_bare"] == 1.0 and all(r["median_ips"] > 0 for r in rows.values())
    assert calls == {"train_switokd": 2, "train_dml": 1, "train_kdcl": 1}

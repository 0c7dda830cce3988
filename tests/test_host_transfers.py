"""Device-to-host copies per training iteration (each is a stall on a GPU).

A SwitOKD iteration copies once (the decision and the logged values together); the
other methods' iterations copy nothing (their logged values stay on the device until
``Run.log`` fetches many iterations at once). Counted: the tensor methods that copy a
value to the host, when called from this repository's code (not from torch's own
CPU-side bookkeeping, e.g. Adam's step counter).
"""
import sys
from pathlib import Path

import pytest
import torch

import models
import train_dml
import train_kd
import train_kdcl
import train_multi
import train_switokd
import train_vanilla
import utils

ROOT = str(Path(__file__).resolve().parents[1])
SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "__index__")


@pytest.fixture
def transfers(monkeypatch):
    """A list that records (method, caller) for every host copy made from the repository's code."""
    calls = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, __original=original, __name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ROOT) and "/tests/" not in caller:
                calls.append((__name, caller))
            return __original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


def nets(*names):
    torch.manual_seed(0)
    return [models.build(name, 10) for name in names]


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


PRECISION = utils.Precision(torch.device("cpu"))


@pytest.mark.parametrize("mode", [[], ["--no-switching"], ["--switch-rule", "algorithm1", "--fixed-delta", "0"]])
def test_switokd_iteration_copies_once(transfers, mode):
    student, teacher = nets("wrn_10_1", "wrn_10_1")
    cfg = train_switokd.parse_args(mode)
    opt_s, opt_t = (torch.optim.Adam(n.parameters()) for n in (student, teacher))
    for _ in range(3):
        transfers.clear()
        train_switokd.train_step(student, teacher, opt_s, opt_t, *batch(), cfg, PRECISION, reduce=lambda v: v)
        assert [name for name, _ in transfers] == ["tolist"]


def test_multi_iteration_copies_once(transfers):
    cfg = train_multi.parse_args(["--teachers", "wrn_10_1", "--students", "wrn_10_1", "wrn_10_1"])
    networks = dict(zip(["student1", "student2", "teacher1"], nets("wrn_10_1", "wrn_10_1", "wrn_10_1")))
    optimizers = {role: torch.optim.Adam(n.parameters()) for role, n in networks.items()}
    train_multi.train_step(networks, optimizers, *batch(), ["teacher1"], ["student1", "student2"], cfg, PRECISION,
                           reduce=lambda v: v)
    assert [name for name, _ in transfers] == ["tolist"]


def test_baseline_iterations_copy_nothing(transfers):
    a, b = nets("wrn_10_1", "wrn_10_1")
    optimizers = {"student": torch.optim.Adam(a.parameters()), "teacher": torch.optim.Adam(b.parameters())}
    roles = {"student": a, "teacher": b}
    x, y = batch()
    train_vanilla.train_step(a, optimizers["student"], x, y, PRECISION)
    train_dml.train_step(roles, optimizers, x, y, 1.0, PRECISION)
    train_kdcl.train_step(roles, optimizers, torch.cat([x, x]), y, 2, "minlogit", None, 2.0, 1.0, PRECISION)
    def kd(z_s, z_t, f_s, f_t, targets):
        total, ce, kl = train_kd.kd_loss(z_s, z_t, targets, 0.1, 3.0)
        return total, {"ce": ce, "kl": kl}
    train_kd.train_step(train_kd.plain(a), train_kd.plain(b.eval()), [optimizers["student"]], x, y, kd, PRECISION)
    assert transfers == []


def test_logging_fetches_many_iterations_at_once(transfers, tmp_path):
    log = utils.IterationLog(writer=None, log_interval=1)
    log.start_epoch(1, 0)
    for i in range(10):
        log.add({"loss": torch.tensor(float(i)), "ce": torch.tensor(1.0), "seconds": 0.1})
    assert transfers == []
    means = log.means()
    assert [name for name, _ in transfers] == ["tolist"]
    assert means == pytest.approx({"loss": 4.5, "ce": 1.0, "seconds": 0.1})

"""DML, KDCL and KD: their losses against hand computations and Table 1's gradients, their
ensembles, data views and teacher loading, and one tiny end-to-end run of each script."""
import copy
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import models
import train_dml
import train_kd
import train_kdcl
import train_vanilla
import utils
from datasets import transforms
from datasets.small import ArrayDataset
from train_dml import mutual_learning_loss
from train_kd import kd_loss
from train_kdcl import (ensemble_target, general_weights, held_out_error_gram, kdcl_loss, linear_weights,
                        min_logit_ensemble, naive_ensemble, project_to_simplex)

TINY = ["--dataset", "synthetic", "--train-subset", "32", "--test-subset", "16", "--batch-size", "16",
        "--workers", "0", "--no-progress", "--epochs", "1"]
PAIR = ["--models", "resnet20", "wrn_16_1"]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def random_logits(m, b=6, c=5, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, generator=gen, dtype=torch.float64) * scale for _ in range(m)], \
        torch.randint(0, c, (b,), generator=gen)


def grad_of(loss_fn, z):
    z = z.clone().requires_grad_(True)
    loss_fn(z)[0].backward()
    return z.grad


# --------------------------------------------------------------------------- DML

def test_mutual_learning_loss_by_hand():
    z1 = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    total, ce, kl_term = mutual_learning_loss(z1, [z2], y, tau=2.0)
    p1 = softmax([1.0, 0.0, -1.0])
    assert ce.item() == pytest.approx(-math.log(p1[0]))
    expected_kl = 4 * kl(softmax([0.0, 2.0, 0.0], 2), softmax([1.0, 0.0, -1.0], 2))
    assert kl_term.item() == pytest.approx(expected_kl)
    assert total.item() == pytest.approx(-math.log(p1[0]) + expected_kl)


def test_dml_with_three_networks_averages_over_peers():
    (z1, z2, z3), y = random_logits(3)
    total, ce, kl_term = mutual_learning_loss(z1, [z2, z3], y, tau=1.5)
    pair = [mutual_learning_loss(z1, [peer], y, tau=1.5)[2] for peer in (z2, z3)]
    assert kl_term.item() == pytest.approx((pair[0] + pair[1]).item() / 2)
    assert total.item() == pytest.approx(F.cross_entropy(z1, y).item() + kl_term.item())


def test_mutual_learning_gradient_is_table1_closed_form():
    # d/dz_k [CE + mean_l tau^2 KL(p_l || p_k)] = [(p_k - y) + tau (p_k^tau - mean_l p_l^tau)] / B
    (z1, z2, z3), y = random_logits(3, seed=1)
    tau = 2.0
    grad = grad_of(lambda z: mutual_learning_loss(z, [z2, z3], y, tau), z1)
    peers = (F.softmax(z2 / tau, 1) + F.softmax(z3 / tau, 1)) / 2
    closed = (F.softmax(z1, 1) - F.one_hot(y, 5) + tau * (F.softmax(z1 / tau, 1) - peers)) / len(y)
    torch.testing.assert_close(grad, closed)
    z2_leaf = z2.clone().requires_grad_(True)
    mutual_learning_loss(z1.clone().requires_grad_(True), [z2_leaf], y, tau)[0].backward()
    assert z2_leaf.grad is None   # the peer is detached


def test_roles():
    def roles(*argv):
        args = train_dml.parse_args(list(argv))
        return utils.cohort(args.models, args.roles)
    assert roles("--models", "a", "b") == {"student": "a", "teacher": "b"}
    assert list(roles("--models", "a", "b", "c")) == ["net1", "net2", "net3"]
    assert roles("--models", "a", "b", "c", "--roles", "s1", "s2", "teacher")["teacher"] == "c"
    for bad in (["--models", "a"], ["--models", "a", "b", "--roles", "x"],
                ["--models", "a", "b", "--roles", "x", "x"], ["--models", "a", "b", "--roles", "x", "y/z"]):
        with pytest.raises(utils.UsageError):
            roles(*bad)


def test_sequential_update_differs_from_simultaneous(tmp_path):
    # One step: the first network's update is the same in both modes; the second learns
    # from the refreshed predictions of the first only under --sequential (Algorithm 1).
    params = {}
    for mode in ("simultaneous", "sequential"):
        extra = ["--sequential"] if mode == "sequential" else []
        results = train_dml.main([*TINY, *PAIR, "--train-subset", "16", "--out", str(tmp_path),
                                  "--run-name", mode, *extra])
        assert results["mutual_learning"]["update"] == mode
        ckpt = torch.load(tmp_path / "dml" / mode / "last.pt", weights_only=False)
        params[mode] = {role: {k: v for k, v in state.items() if "running" not in k and "batches" not in k}
                        for role, state in ckpt["models"].items()}
    a, b = params["simultaneous"], params["sequential"]
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert any(not torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])
    on_disk = json.loads((tmp_path / "dml" / "sequential" / "results.json").read_text())
    assert on_disk["method"] == "dml" and set(on_disk["networks"]) == {"student", "teacher"}
    row = json.loads((tmp_path / "dml" / "sequential" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train/student/ce", "train/teacher/kl", "test/teacher/top1", "lr/student"} <= row.keys()


def test_dml_train_step():
    # Three linear networks, one SGD step (lr 1) each way. Simultaneous: every network steps on the gradient
    # of its own DML loss at the common forward pass. Sequential: the first network's step is the same; the
    # others learn from the refreshed predictions of the networks updated before them.
    torch.manual_seed(0)
    initial = {role: nn.Linear(6, 4) for role in ("net1", "net2", "net3")}
    x, y, tau = torch.randn(5, 6), torch.randint(0, 4, (5,)), 2.0
    logits = [net(x) for net in initial.values()]
    expected = {}
    for k, (role, net) in enumerate(initial.items()):
        peers = [z.detach() for j, z in enumerate(logits) if j != k]
        grad = torch.autograd.grad(mutual_learning_loss(logits[k], peers, y, tau)[0], net.weight)[0]
        expected[role] = net.weight.detach() - grad
    after = {}
    for sequential in (False, True):
        nets = copy.deepcopy(initial)
        optimizers = {role: torch.optim.SGD(net.parameters(), lr=1.0) for role, net in nets.items()}
        values = train_dml.train_step(nets, optimizers, x, y, tau, utils.Precision(torch.device("cpu")), sequential)
        assert list(values) == [f"{r}/{k}" for r in nets for k in ("ce", "kl")]
        assert values["net1/ce"].item() == pytest.approx(F.cross_entropy(logits[0], y).item())
        after[sequential] = {role: net.weight.detach() for role, net in nets.items()}
    for role in initial:
        torch.testing.assert_close(after[False][role], expected[role])
    assert torch.equal(after[True]["net1"], after[False]["net1"])
    assert not torch.equal(after[True]["net2"], after[False]["net2"])
    assert not torch.equal(after[True]["net3"], after[False]["net3"])


# --------------------------------------------------------------------------- KDCL

def test_min_logit_by_hand():
    z1 = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    z2 = torch.tensor([[1.0, 2.0, -4.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2])
    # sample 0: z1 - 3 = [0, -2, -3], z2 - 1 = [0, 1, -5] -> [0, -2, -5]
    # sample 1: z1 - 5 = [-5, -3, 0], z2 - 1 = [0, 0, 0] -> [-5, -3, 0]
    expected = torch.tensor([[0.0, -2.0, -5.0], [-5.0, -3.0, 0.0]])
    torch.testing.assert_close(min_logit_ensemble([z1, z2], y), expected)


def test_min_logit_properties():
    logits, y = random_logits(3, b=32, c=10, seed=2)
    z_m = min_logit_ensemble(logits, y)
    assert torch.all(z_m.gather(1, y[:, None]) == 0)
    for z in logits:
        assert torch.all(z_m <= z - z.gather(1, y[:, None]))
    # every network's shifted probability of the true class is at most the ensemble's
    p_true = F.softmax(z_m, 1).gather(1, y[:, None])
    for z in logits:
        assert torch.all(F.softmax(z, 1).gather(1, y[:, None]) <= p_true + 1e-12)


def test_naive_picks_the_lowest_cross_entropy_per_sample():
    z1 = torch.tensor([[4.0, 0.0], [4.0, 0.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    torch.testing.assert_close(naive_ensemble([z1, z2], y), torch.tensor([[4.0, 0.0], [0.0, 1.0]]))


def test_simplex_projection():
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.5, 0.5], dtype=torch.float64)),
                               torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(project_to_simplex(torch.tensor([2.0, 0.0], dtype=torch.float64)),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.3, 0.3, -1.0], dtype=torch.float64)),
                               torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_linear_weights_are_convex_and_beat_every_network(seed):
    logits, y = random_logits(3, b=16, c=10, seed=seed)
    a = linear_weights(logits, y)
    assert torch.all(a >= 0) and a.sum().item() == pytest.approx(1.0)
    z_m, used = ensemble_target("linear", logits, y)
    torch.testing.assert_close(used, a)
    ce = F.cross_entropy(z_m, y).item()
    for z in logits:
        assert ce <= F.cross_entropy(z, y).item() + 1e-9


def test_linear_weights_match_a_grid_search_for_two_networks():
    (z1, z2), y = random_logits(2, b=16, c=10, seed=6)
    a = linear_weights([z1, z2], y)
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    mixed = grid[:, None, None] * z1 + (1 - grid[:, None, None]) * z2          # (grid, B, C)
    values = -mixed.log_softmax(2).gather(2, y.expand(len(grid), -1)[..., None]).mean((1, 2))
    best = F.cross_entropy(a[0] * z1 + a[1] * z2, y).item()
    assert best <= values.min().item() + 1e-7
    assert a[0].item() == pytest.approx(grid[values.argmin()].item(), abs=2e-3)


def test_general_weights_closed_form():
    c = torch.tensor([[0.5, 0.2], [0.2, 0.3]])
    w = general_weights(c)
    # two networks: w_1 = (C22 - C12) / (C11 + C22 - 2 C12)
    assert w[0].item() == pytest.approx(0.1 / 0.4) and w.sum().item() == pytest.approx(1.0)
    c3 = torch.tensor([[1.0, 0.2, 0.1], [0.2, 0.8, 0.3], [0.1, 0.3, 0.6]], dtype=torch.float64)
    expected = torch.linalg.solve(c3, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(general_weights(c3).double(), expected / expected.sum(), rtol=1e-5, atol=1e-6)
    # w minimises w' C w on the plane sum(w) = 1
    best = general_weights(c3).double()
    for d in (torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.0, 1.0, -1.0])):
        moved = best + 0.01 * d.double()
        assert best @ c3 @ best < moved @ c3 @ moved


def test_held_out_error_gram_by_hand():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(12, 3)) for _ in range(2)]
    images, labels = torch.randn(10, 3, 2, 2), torch.randint(0, 3, (10,))
    loader = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    nets[1].train()
    gram = held_out_error_gram(nets, loader, utils.Precision(torch.device("cpu")))
    assert nets[0].training and nets[1].training  # modes restored
    with torch.no_grad():
        e = [F.softmax(net(images), 1) - F.one_hot(labels, 3) for net in nets]
    expected = torch.tensor([[(e[i] * e[j]).sum().item() / 10 for j in range(2)] for i in range(2)])
    torch.testing.assert_close(gram.float(), expected)


def test_kdcl_loss_and_gradient_are_table1():
    (z, z_m), y = random_logits(2, seed=7)
    lam, tau = 0.5, 3.0
    total, ce, kl_term = kdcl_loss(z, z_m, y, lam, tau)
    p_m, p = softmax(z_m[0].tolist(), tau), softmax(z[0].tolist(), tau)
    per_sample = [tau ** 2 * kl(softmax(a.tolist(), tau), softmax(b.tolist(), tau)) for a, b in zip(z_m, z)]
    assert per_sample[0] == pytest.approx(tau ** 2 * kl(p_m, p))
    assert kl_term.item() == pytest.approx(sum(per_sample) / len(y))
    assert total.item() == pytest.approx(ce.item() + lam * kl_term.item())
    grad = grad_of(lambda t: kdcl_loss(t, z_m, y, lam, tau), z)
    closed = F.softmax(z, 1) - F.one_hot(y, 5) + lam * tau * (F.softmax(z / tau, 1) - F.softmax(z_m / tau, 1))
    torch.testing.assert_close(grad, closed / len(y))


def flip_only(bundle):
    """The bundle with crops of zero padding, so an augmentation is the image or its mirror."""
    images, labels = bundle.train_arrays
    train = ArrayDataset(images, labels, transforms.crop_flip(32, 0, True, bundle.mean, bundle.std))
    return dataclasses.replace(bundle, crop_padding=0, train=train)


@pytest.mark.parametrize("kind", ["tensor", "torch"])
def test_views_are_independent_augmentations_of_the_same_images(kind):
    bundle = flip_only(datasets.build("synthetic", train_subset=40, test_subset=8))
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (bundle.mean, bundle.std))
    originals = (bundle.train_arrays[0].float() / 255 - mean) / std

    def index_of(image):
        return [i for i, o in enumerate(originals)
                if torch.allclose(image, o, atol=1e-5) or torch.allclose(image, o.flip(-1), atol=1e-5)]

    loaders = datasets.make_loaders(datasets.split_holdout(bundle, 10), 8, 8, loader=kind, workers=0, seed=3,
                                    views=3)
    train, held = loaders.train, loaders.holdout
    assert len(train) == 4                               # 40 images - 10 held out, 8 per batch
    train.set_epoch(1)
    seen, mirrored = set(), 0
    for images, targets in train:
        views = images.chunk(3)
        for b, label in enumerate(targets.tolist()):
            (index,) = index_of(views[0][b])
            assert all(index_of(v[b]) == [index] for v in views[1:])
            assert bundle.train_arrays[1][index] == label
            mirrored += sum(not torch.equal(v[b], views[0][b]) for v in views[1:])
            seen.add(index)
    assert len(seen) == 30 and mirrored > 0
    held_images = torch.cat([images for images, _ in held])        # unaugmented, never trained on
    held_out = [index_of(x) for x in held_images]
    assert all(len(i) == 1 and torch.allclose(x, originals[i[0]], atol=1e-5)
               for x, i in zip(held_images, held_out))
    assert len({i[0] for i in held_out}) == 10 and not seen & {i[0] for i in held_out}


@pytest.mark.parametrize("kind", ["tensor", "torch"])
def test_one_view_is_the_standard_augmentation(kind):
    # --shared-augmentation: one view and no holdout is the standard loader
    bundle = datasets.build("synthetic", train_subset=24, test_subset=8)
    one = datasets.make_loaders(bundle, 8, 8, loader=kind, workers=0, seed=3, views=1)
    standard = datasets.make_loaders(bundle, 8, 8, loader=kind, workers=0, seed=3)
    assert one.holdout is None and standard.holdout is None
    for loader in (one.train, standard.train):
        loader.set_epoch(2)
    for (x, y), (x_ref, y_ref) in zip(one.train, standard.train, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_kdcl_asks_for_one_view_per_network(tmp_path, monkeypatch):
    asked = []
    make_loaders = datasets.make_loaders

    def spy(bundle, *args, **kwargs):
        asked.append((kwargs.get("views", 1), bundle.holdout is not None))
        return make_loaders(bundle, *args, **kwargs)
    monkeypatch.setattr(datasets, "make_loaders", spy)
    monkeypatch.setattr(utils.Run, "epochs", lambda self: range(0))  # the loaders are all this test needs
    three = ["--models", "resnet20", "wrn_16_1", "resnet20"]
    general = [*PAIR, "--ensemble", "general"]
    for name, flags in (("k", three), ("s", [*three, "--shared-augmentation"]), ("g", general)):
        train_kdcl.main([*TINY, *flags, "--out", str(tmp_path), "--run-name", name])
    assert asked == [(3, False), (1, False), (2, True)]


def test_kdcl_end_to_end_general(tmp_path):
    results = train_kdcl.main([*TINY, *PAIR, "--ensemble", "general", "--holdout", "8",
                               "--out", str(tmp_path)])
    assert results["kdcl"]["ensemble"] == "general" and results["kdcl"]["holdout"] == 8
    assert sum(results["kdcl"]["general_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    run_dir = next((tmp_path / "kdcl").iterdir())
    assert json.loads((run_dir / "results.json").read_text())["kdcl"]["augmentation"] == "per-network"
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"ensemble/w_student", "train/ensemble_ce", "train/teacher/kl", "test/student/top1"} <= row.keys()
    assert row["ensemble/w_student"] == pytest.approx(results["kdcl"]["general_weights"]["student"])


def test_kdcl_train_step_one_view_per_network():
    # network k sees view k mod views; one backward of the summed KDCL losses against the MinLogit target
    torch.manual_seed(1)
    nets = {role: nn.Linear(6, 4) for role in ("student", "teacher")}
    initial = copy.deepcopy(nets)
    optimizers = {role: torch.optim.SGD(net.parameters(), lr=1.0) for role, net in nets.items()}
    views, y = torch.randn(2, 5, 6), torch.randint(0, 4, (5,))
    values = train_kdcl.train_step(nets, optimizers, views.flatten(0, 1), y, 2, "minlogit", None, 2.0, 1.0,
                                   utils.Precision(torch.device("cpu")))
    logits = [initial[role](views[k]) for k, role in enumerate(nets)]
    z_m = min_logit_ensemble([z.detach() for z in logits], y)
    assert values["ensemble_ce"].item() == pytest.approx(F.cross_entropy(z_m, y).item())
    for k, role in enumerate(nets):
        total, ce, kl_term = kdcl_loss(logits[k], z_m, y, 1.0, 2.0)
        assert values[f"{role}/ce"].item() == pytest.approx(ce.item())
        grad = torch.autograd.grad(total, initial[role].weight)[0]
        torch.testing.assert_close(nets[role].weight.detach(), initial[role].weight.detach() - grad)


def test_kdcl_rejects_holdout_without_general(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_kdcl.main([*TINY, *PAIR, "--holdout", "8", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--holdout" in capsys.readouterr().err


# --------------------------------------------------------------------------- KD

def test_kd_loss_by_hand_and_table1_gradient():
    (z_s, z_t), y = random_logits(2, seed=8)
    alpha, tau = 0.3, 3.0
    total, ce, kl_term = kd_loss(z_s, z_t, y, alpha, tau)
    by_hand = sum(tau ** 2 * kl(softmax(t.tolist(), tau), softmax(s.tolist(), tau)) for s, t in zip(z_s, z_t))
    assert kl_term.item() == pytest.approx(by_hand / len(y))
    expected = alpha * F.cross_entropy(z_s, y).item() + (1 - alpha) * kl_term.item()
    assert total.item() == pytest.approx(expected)
    grad = grad_of(lambda z: kd_loss(z, z_t, y, alpha, tau), z_s)
    closed = alpha * (F.softmax(z_s, 1) - F.one_hot(y, 5)) + \
        (1 - alpha) * tau * (F.softmax(z_s / tau, 1) - F.softmax(z_t / tau, 1))
    torch.testing.assert_close(grad, closed / len(y))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train_vanilla.main([*TINY, "--model", "wrn_16_1", "--role", "teacher", "--out", str(out),
                        "--run-name", "t"])
    return out / "vanilla" / "t"


def test_kd_end_to_end_keeps_the_teacher_fixed(tmp_path, teacher_dir, loaded_teacher):
    captured = loaded_teacher
    results = train_kd.main([*TINY, "--student", "resnet20", "--teacher-ckpt", str(teacher_dir),
                             "--out", str(tmp_path), "--run-name", "kd"])
    saved = torch.load(teacher_dir / "best_teacher.pt", weights_only=False)
    after = captured["teacher"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in saved["model"].items())
    assert not captured["teacher"].training
    assert not any(p.requires_grad for p in captured["teacher"].parameters())
    assert list(results["networks"]) == ["student"]
    teacher = results["teacher"]
    assert teacher["arch"] == "wrn_16_1" and teacher["file"].endswith("best_teacher.pt")
    assert (teacher["dataset"], teacher["role"]) == ("synthetic", "teacher")
    assert teacher["test_top1"] == pytest.approx(saved["metrics"]["top1"])
    on_disk = json.loads((tmp_path / "kd" / "kd" / "results.json").read_text())
    assert on_disk["kd"] == {"form": "table1", "alpha": 0.1, "tau": 3.0} and on_disk["method"] == "kd"


def test_kd_checkpoint_resolution(teacher_dir):
    assert models.checkpoint_file(teacher_dir).name == "best_teacher.pt"
    assert models.checkpoint_file(teacher_dir, role="teacher").name == "best_teacher.pt"
    assert models.checkpoint_file(teacher_dir / "last.pt").name == "last.pt"
    info = models.read_checkpoint(teacher_dir / "last.pt")
    assert info["arch"] == "wrn_16_1" and info["num_classes"] is None and info["image_size"] is None
    assert (info["role"], info["dataset"]) == ("teacher", "synthetic")
    assert info["state_dict"].keys() == models.build("wrn_16_1", 10).state_dict().keys()
    with pytest.raises(ValueError, match="holds the teacher, not the student"):
        models.read_checkpoint(teacher_dir / "best_teacher.pt", role="student")
    with pytest.raises(ValueError, match="class count"):
        models.load(teacher_dir / "last.pt")
    # the network, from the run directory or its last.pt: weights loaded, eval mode, described
    best = torch.load(teacher_dir / "best_teacher.pt", weights_only=False)
    for net in (models.load(teacher_dir), models.load(teacher_dir / "last.pt", num_classes=10, image_size=32)):
        assert not net.training and net.checkpoint["arch"] == "wrn_16_1"
    net = models.load(teacher_dir)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in best["model"].items())
    assert net.checkpoint["file"].endswith("best_teacher.pt") and "state_dict" not in net.checkpoint


def run_guarded(argv, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["train_kd.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        utils.main_guard(train_kd.main)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_kd_refuses_a_checkpoint_of_the_wrong_class_count(tmp_path, monkeypatch, capsys):
    wrong = tmp_path / "best_teacher.pt"
    torch.save({"arch": "wrn_16_1", "num_classes": 5, "image_size": 32,
                "model": models.build("wrn_16_1", 5).state_dict()}, wrong)
    code, err = run_guarded([*TINY, "--student", "resnet20", "--teacher-ckpt", str(tmp_path),
                             "--out", str(tmp_path / "runs")], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "num_classes 5, not 10" in err[0] and "--teacher-ckpt" in err[0], err


def test_kd_refuses_a_teacher_of_another_dataset(tmp_path, teacher_dir, monkeypatch, capsys):
    code, err = run_guarded(["--dataset", "digits", *TINY[2:], "--student", "resnet20", "--teacher-ckpt",
                             str(teacher_dir), "--out", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "trained on synthetic, not digits" in err[0], err


def test_kd_refuses_mismatching_missing_or_corrupt_files(tmp_path):
    data = SimpleNamespace(name="synthetic", num_classes=10, image_size=32)
    last_wrong = tmp_path / "last.pt"
    five_classes = models.build("wrn_16_1", 5).state_dict()
    torch.save({"networks": {"teacher": "wrn_16_1"}, "models": {"teacher": five_classes}}, last_wrong)
    small = tmp_path / "small.pt"
    torch.save({"arch": "wrn_16_1", "num_classes": 10, "image_size": 64, "model": {}}, small)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"arch": "wrn_16_1", "num_classes": 10, "image_size": 32, "dataset": "cifar10",
                "model": models.build("wrn_16_1", 10).state_dict()}, other)
    cases = ((last_wrong, "does not fit"), (small, "image_size 64, not 32"),
             (tmp_path / "missing.pt", "no checkpoint"),
             (corrupt, "cannot read"), (tmp_path / "empty_dir", "no checkpoint in"),
             (other, "trained on cifar10, not synthetic"))
    (tmp_path / "empty_dir").mkdir()
    for path, message in cases:
        with pytest.raises(utils.UsageError, match=message) as error:
            train_kd.load_teacher(path, data, torch.device("cpu"), torch.contiguous_format)
        assert "\n" not in str(error.value) and str(error.value).startswith("--teacher-ckpt")

"""The OKDDip-family scripts (train_okddip.py, train_one.py) and DML's OKDDip form: the release's KL,
ramp-up, attention targets, gate, ILR, every loss and the diversity measure against hand computations;
the okddip recipe's schedule; the model names of the registry; each method end to end with exact resume.
The specification is the release as docs/OKDDIP.md states it ("R x": its last section)."""
import copy
import csv
import io
import json
import math

import pytest
import torch

import distill
import models
import train_dml
import train_okddip
import train_one
import utils

TINY = ["--dataset", "synthetic", "--train-subset", "32", "--test-subset", "16", "--batch-size", "16",
        "--test-batch-size", "16", "--workers", "0", "--no-progress", "--branches", "3", "--ramp-length", "1"]


# --------------------------------------------------------------------------- hand computations

def softmax(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def release_kl(teacher_rows, student_rows, tau):
    """utils.KL_Loss of the release on lists of rows: T^2 mean_b sum_c p (log p - log q), p = softmax(t/T) + 1e-7."""
    total = 0.0
    for t, s in zip(teacher_rows, student_rows):
        p = [v + 1e-7 for v in softmax(t, tau)]
        q = softmax(s, tau)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return tau * tau * total / len(teacher_rows)


def ce(rows, labels):
    return sum(-math.log(softmax(z)[y]) for z, y in zip(rows, labels)) / len(rows)


def rows(t):
    return t.tolist()


def tiny_logits(m=4, b=2, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, b, c, generator=gen, dtype=torch.float64) * 2, torch.randint(0, c, (b,), generator=gen)


def test_release_kl_by_hand_with_its_epsilon():
    t = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 1.0, -1.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
    value = distill.okddip_kl(t, s, tau=3.0).item()
    assert value == pytest.approx(release_kl(rows(t), rows(s), 3.0), rel=1e-12)
    without_epsilon = distill.kl_loss(t, s, tau=3.0).item()  # the plain tau^2 KL: differs by the 1e-7 alone
    assert abs(value - without_epsilon) > 1e-8 and value == pytest.approx(without_epsilon, rel=1e-5)
    # against itself: T^2 sum_c (p + e) log((p + e) / p) = T^2 C e to first order, not 0
    assert distill.okddip_kl(s, s, 3.0).item() == pytest.approx(9 * 3 * 1e-7, rel=1e-3)


def test_release_kl_is_not_detached():
    t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    distill.okddip_kl(t, s).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


def test_ramp_values():
    w = distill.consistency_weight
    assert [round(w(e), 4) for e in (0, 40, 80)] == [0.0067, 0.2865, 1.0]
    assert w(0) == pytest.approx(math.exp(-5)) and w(10) == pytest.approx(0.0218, abs=5e-5)
    assert w(79) == pytest.approx(0.9992, abs=5e-5) and w(200) == 1.0 and w(-3) == w(0)
    assert w(2, length=4) == pytest.approx(math.exp(-5 / 4)) and w(0, length=0) == 1.0


# --------------------------------------------------------------------------- OKDDip

def test_attention_targets_are_weighted_sums_of_peer_logits():
    z, _ = tiny_logits(m=3, b=2, c=4)
    a = torch.softmax(torch.randn(2, 3, 3, dtype=torch.float64), -1)
    x = train_okddip.peer_targets(z, a)
    for b in range(2):
        for i in range(3):
            torch.testing.assert_close(x[i, b], sum(a[b, i, j] * z[j, b] for j in range(3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(train_okddip.leader_target(z), (z[0] + z[1] + z[2]) / 3)


def test_okddip_loss_by_hand():
    z, y = tiny_logits(m=4)
    a = torch.softmax(torch.randn(2, 3, 3, dtype=torch.float64), -1)
    w, alpha, tau = 0.3, 0.7, 3.0
    total, ce_sum, kl_peers, kl_leader = train_okddip.okddip_loss(z, a, y, w, alpha, tau)
    zl, al, yl = rows(z), rows(a), y.tolist()
    x = [[[sum(al[b][i][j] * zl[j][b][c] for j in range(3)) for c in range(3)] for b in range(2)] for i in range(3)]
    leader_t = [[sum(zl[j][b][c] for j in range(3)) / 3 for c in range(3)] for b in range(2)]
    want_ce = sum(ce(zl[k], yl) for k in range(4))
    want_peers = sum(release_kl(x[i], zl[i], tau) for i in range(3))
    want_leader = release_kl(leader_t, zl[3], tau)
    assert ce_sum.item() == pytest.approx(want_ce, rel=1e-12)
    assert kl_peers.item() == pytest.approx(want_peers, rel=1e-12)
    assert kl_leader.item() == pytest.approx(want_leader, rel=1e-12)
    assert total.item() == pytest.approx(want_ce + alpha * w * (want_peers + want_leader), rel=1e-12)


@pytest.mark.parametrize("detach", [False, True])
def test_query_key_learn_only_through_live_targets(detach):
    torch.manual_seed(0)
    model = models.build("okddip:resnet32", 10).train()
    out = model(torch.randn(4, 3, 32, 32))
    y = torch.randint(0, 10, (4,))
    total = train_okddip.okddip_loss(out.logits, out.attention, y, weight=0.5, detach=detach)[0]
    total.backward()
    for w in (model.attention.query.weight, model.attention.key.weight):
        if detach:
            assert w.grad is None
        else:
            assert w.grad is not None and w.grad.abs().sum() > 0
    # the live targets also push gradient into the peers: the leader's KL alone reaches peer 0
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(4, 3, 32, 32))
    _, _, _, kl_leader = train_okddip.okddip_loss(out.logits, out.attention, y, weight=1.0, detach=detach)
    kl_leader.backward()
    peer0 = model.branches[0].classifier.weight.grad
    assert (peer0 is not None and peer0.abs().sum() > 0) != detach


# --------------------------------------------------------------------------- ONE, CL-ILR, Ind

def test_gate_on_the_simplex_and_the_gated_ensemble():
    torch.manual_seed(0)
    model = models.build("one:resnet32", 10).train()
    out = model(torch.randn(5, 3, 32, 32))
    assert (out.gate >= 0).all()
    torch.testing.assert_close(out.gate.sum(1), torch.ones(5))
    z_e = train_one.gated_ensemble(out.logits, out.gate)
    torch.testing.assert_close(z_e, sum(out.gate[:, k, None] * out.logits[k] for k in range(4)))


def test_one_loss_by_hand():
    z, y = tiny_logits(m=4)
    g = torch.softmax(torch.randn(2, 4, dtype=torch.float64), 1)
    w, alpha, tau = 0.25, 1.0, 3.0
    total, ce_sum, kl = train_one.one_loss(z, g, y, w, alpha, tau)
    zl, gl, yl = rows(z), rows(g), y.tolist()
    z_e = [[sum(gl[b][k] * zl[k][b][c] for k in range(4)) for c in range(3)] for b in range(2)]
    want_ce = sum(ce(zl[k], yl) for k in range(4)) + ce(z_e, yl)
    want_kl = sum(release_kl(z_e, zl[k], tau) for k in range(4))
    assert ce_sum.item() == pytest.approx(want_ce, rel=1e-12)
    assert kl.item() == pytest.approx(want_kl, rel=1e-12)
    assert total.item() == pytest.approx(want_ce + alpha * w * want_kl, rel=1e-12)


def test_one_detach_stops_the_kl_at_the_ensemble_only():
    z, y = tiny_logits(m=4)
    g = torch.softmax(torch.randn(2, 4, dtype=torch.float64), 1)
    grads = {}
    for detach in (False, True):
        gate = g.clone().requires_grad_(True)
        train_one.one_loss(z.clone().requires_grad_(True), gate, y, 1.0, detach=detach)[2].backward()  # the KL alone
        grads[detach] = gate.grad
    assert grads[False].abs().sum() > 0 and grads[True] is None
    gate = g.clone().requires_grad_(True)
    train_one.one_loss(z, gate, y, 1.0, detach=True)[0].backward()  # the ensemble's CE still trains the gate
    assert gate.grad.abs().sum() > 0


def test_clilr_loss_by_hand():
    z, y = tiny_logits(m=4)
    w, alpha, tau = 0.5, 2.0, 3.0
    total, ce_sum, kl = train_one.clilr_loss(z, y, w, alpha, tau)
    zl, yl = rows(z), y.tolist()
    x = [[[sum(zl[j][b][c] for j in range(4) if j != k) / 3 for c in range(3)] for b in range(2)] for k in range(4)]
    want_ce = sum(ce(zl[k], yl) for k in range(4))
    want_kl = sum(release_kl(x[k], zl[k], tau) for k in range(4))
    assert ce_sum.item() == pytest.approx(want_ce, rel=1e-12)
    assert kl.item() == pytest.approx(want_kl, rel=1e-12)
    assert total.item() == pytest.approx(want_ce + alpha * w * want_kl, rel=1e-12)


def test_ind_loss_by_hand():
    z, y = tiny_logits(m=4)
    total, ce_sum = train_one.ind_loss(z, y)
    assert total.item() == ce_sum.item() == pytest.approx(sum(ce(rows(z)[k], y.tolist()) for k in range(4)), rel=1e-12)


def test_ilr_divides_the_trunk_gradient_by_m_through_the_clilr_loss():
    torch.manual_seed(0)
    scaled = models.build("clilr:resnet32", 10).double().train()
    assert scaled.ilr
    plain = copy.deepcopy(scaled)
    plain.ilr = False
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    for model in (plain, scaled):
        train_one.clilr_loss(model(x).logits, y, weight=0.7)[0].backward()
    checked = 0
    for (name, p), q in zip(plain.named_parameters(), scaled.parameters()):
        if name.startswith("trunk."):
            torch.testing.assert_close(q.grad, p.grad / 4, rtol=1e-13, atol=0)
            checked += p.grad.abs().sum() > 0
        else:
            assert torch.equal(q.grad, p.grad), name
    assert checked > 0


# --------------------------------------------------------------------------- diversity

def test_release_diversity_by_hand_with_its_quirks():
    z, _ = tiny_logits(m=4, b=2, c=3)
    d = distill.release_diversity(z)
    p = [[softmax(row) for row in branch] for branch in rows(z)]
    for b in range(2):
        pairs = [(0, 1), (0, 2), (1, 2)]  # branches 0..m-2 only
        want = sum(math.dist(p[j][b], p[k][b]) for j, k in pairs) / 3
        assert d[b].item() == pytest.approx(want, rel=1e-6)
    changed = z.clone()
    changed[3] = torch.randn(2, 3, dtype=torch.float64)  # the last branch (OKDDip's leader) never counts
    torch.testing.assert_close(distill.release_diversity(changed), d)
    three = distill.release_diversity(z[:3])  # m = 3: one pair, still divided by 3
    torch.testing.assert_close(three, torch.tensor([math.dist(p[0][b], p[1][b]) / 3 for b in range(2)]),
                               rtol=1e-6, atol=0)
    meter = distill.DiversityMeter()
    meter.add(z[:, :1])
    meter.add(z[:, 1:])
    assert meter.value() == pytest.approx(d.double().mean().item(), rel=1e-12)


# --------------------------------------------------------------------------- recipe and registry

def test_okddip_recipe_learning_rates_at_the_drops():
    recipe = utils.recipe_for("okddip", "cifar100", "net")
    assert (recipe.optimizer, recipe.lr, recipe.momentum, recipe.nesterov, recipe.weight_decay) == \
        ("sgd", 0.1, 0.9, True, 5e-4)
    assert (recipe.epochs, recipe.milestones, recipe.gamma, recipe.batch_size, recipe.test_batch_size) == \
        (300, (150, 225), 0.1, 128, 128)
    assert utils.recipe_for("okddip", "cifar10", "net") == recipe == utils.recipe_for("okddip", "digits", "net")
    optimizer = utils.build_optimizer([torch.zeros(1, requires_grad=True)], recipe)
    schedule = utils.lr_schedule(optimizer, utils.scaled_milestones(recipe, 300), recipe.gamma, recipe.lr_drop)
    lrs = []  # lrs[e] = the rate of 0-based epoch e (the scheduler steps after every epoch)
    for _ in range(300):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [lrs[e] for e in (148, 149, 223, 224)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    assert lrs.count(0.1) == 149 and lrs[299] == pytest.approx(0.001)


def test_registry_names():
    for name, kwargs in [("okddip:resnet32", dict(method="okddip", backbone="resnet32")),
                         ("one:vgg16@3", dict(method="one", backbone="vgg16", branches=3)),
                         ("clilr:densenet40_12-shared@5", dict(method="clilr", backbone="densenet40_12",
                                                               shared_dense_block=True, branches=5))]:
        assert models.okddip.parse_okddip_name(name) == kwargs
        assert models.okddip_name(**{"branches": 4, "shared_dense_block": False, **kwargs}) == name
    with torch.device("meta"):
        assert models.count_parameters(models.build("okddip:resnet32", 100)) == 1_554_272
        assert models.count_parameters(models.build("okddip-net:resnet32", 100)) == 1_892_048
        assert models.count_parameters(models.build("baseline:resnet32", 100)) == 472_756
        assert models.count_parameters(models.build("one:densenet40_12-shared", 100)) == 229_036
        ind = models.build("ind:resnet32", 100)
        assert models.count_parameters(ind) == 1_553_388  # the release's unused gate is there ...
        assert {n for n, p in ind.named_parameters() if not p.requires_grad} == \
            {n for n, _ in ind.named_parameters() if n.startswith("gate.")} and len(list(ind.gate.parameters())) == 4
        assert models.build("okddip:resnet32@3", 100).attention is not None
        assert len(models.build("one:resnet32@3", 10).branches) == 3
    for bad in ("okddip:resnet20", "baseline:resnet32@3", "okddip:resnet32@1", "one:resnet32-shared", "dml:resnet32",
                "okddip-net:densenet40_12-shared"):
        with pytest.raises(ValueError):
            models.build(bad, 10)


@pytest.mark.parametrize("script, argv, message", [
    (train_okddip, ["--backbone", "resnet32", "--shared-dense-block"], "--shared-dense-block"),
    (train_okddip, ["--backbone", "resnet20"], "--backbone"),
    (train_okddip, ["--branches", "1"], "--branches"),
    (train_one, ["--method", "ind", "--ilr"], "--method ind"),
    (train_one, ["--method", "dml"], "--method"),
    (train_dml, ["--sequential", "--live-targets"], "--live-targets"),
    (train_dml, ["--peer-target", "mean"], "--peer-target"),
])
def test_bad_flags_exit_2_with_one_line(script, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        script.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- DML, the OKDDip form

def test_dml_okddip_form_by_hand():
    z, y = tiny_logits(m=4)
    zl, yl = rows(z), y.tolist()
    total, ce_term, kl = train_dml.mutual_learning_loss(z[0], [z[1], z[2], z[3]], y, tau=3.0,
                                                        peer_target="mean-logits", detach=False, kl="okddip")
    mean = [[sum(zl[j][b][c] for j in (1, 2, 3)) / 3 for c in range(3)] for b in range(2)]
    assert ce_term.item() == pytest.approx(ce(zl[0], yl), rel=1e-12)
    assert kl.item() == pytest.approx(release_kl(mean, zl[0], 3.0), rel=1e-12)
    assert total.item() == pytest.approx(ce(zl[0], yl) + release_kl(mean, zl[0], 3.0), rel=1e-12)  # no ramp
    peers = [z[j].clone().requires_grad_(True) for j in (1, 2, 3)]
    train_dml.mutual_learning_loss(z[0], peers, y, 3.0, "mean-logits", detach=False, kl="okddip")[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peers)  # live targets
    peers = [z[j].clone().requires_grad_(True) for j in (1, 2, 3)]
    train_dml.mutual_learning_loss(z[0].clone().requires_grad_(True), peers, y, 3.0, "mean-logits")[0].backward()
    assert all(p.grad is None for p in peers)  # DML's default: detached
    # the default stays DML: the mean over peers of one hinton KL each
    pairwise = train_dml.mutual_learning_loss(z[0], [z[1], z[2]], y, 2.0)[2]
    assert pairwise.item() == pytest.approx(
        (distill.kl_loss(z[1], z[0], 2.0) + distill.kl_loss(z[2], z[0], 2.0)).item() / 2, rel=1e-12)


# --------------------------------------------------------------------------- end to end, exact resume

RUNS = {
    "okddip": (train_okddip, "okddip", []),
    "okddip-net": (train_okddip, "okddip", ["--network-based"]),
    "one": (train_one, "one", ["--method", "one"]),
    "clilr": (train_one, "one", ["--method", "clilr"]),
    "ind": (train_one, "one", ["--method", "ind"]),
    "dml": (train_dml, "dml", ["--recipe", "okddip", "--models", "resnet32", "resnet32", "resnet32", "--tau", "3",
                               "--peer-target", "mean-logits", "--live-targets", "--kl", "okddip"]),
}


def run_flags(kind):
    flags = RUNS[kind][2]
    if kind == "dml":  # no branches, no ramp
        return TINY[:-4] + flags
    return TINY + flags


@pytest.mark.parametrize("kind", list(RUNS))
def test_end_to_end_and_exact_resume(kind, tmp_path, interrupted_after):
    script, folder, _ = RUNS[kind]
    flags = [*run_flags(kind), "--epochs", "2", "--out", str(tmp_path)]
    results = script.main([*flags, "--run-name", "straight"])
    with interrupted_after(1):
        script.main([*flags, "--run-name", "resumed"])
    assert torch.load(tmp_path / folder / "resumed" / "last.pt", weights_only=False)["epoch"] == 1
    script.main([*flags, "--run-name", "resumed", "--resume"])
    a, b = (torch.load(tmp_path / folder / name / "last.pt", weights_only=False) for name in ("straight", "resumed"))
    for role, state in a["models"].items():
        for key, value in state.items():
            assert torch.equal(value, b["models"][role][key]), (role, key)

    run_dir = tmp_path / folder / "straight"
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["recipe"] == "okddip" and results["epochs"] == 2
    if kind == "dml":
        cohort = on_disk["measured"]["cohort_mean"]
        means = [sum(row[f"test/net{k}/top1"] for k in (1, 2, 3)) / 3 for row in history]
        assert cohort["per_epoch"] == pytest.approx(means) and cohort["best_top1"] == max(means)
        form = on_disk["mutual_learning"]
        assert form["peer_target"] == "mean-logits" and not form["detach_targets"] and form["kl"] == "okddip"
        return
    arch = {"okddip": "okddip:resnet32@3", "okddip-net": "okddip-net:resnet32@3"}.get(kind, f"{kind}:resnet32@3")
    assert on_disk["networks"]["net"]["arch"] == arch and on_disk["backbone"] == "resnet32"
    row = history[-1]
    assert row["ramp_weight"] == 1.0 and history[0]["ramp_weight"] == pytest.approx(math.exp(-5))
    assert on_disk["measured"]["diversity"]["per_epoch"] == [r["diversity"] for r in history]
    assert all(r["diversity"] >= 0 for r in history)
    if folder == "okddip":
        assert {"test/net/top1", "test/peer0/top1", "test/peer1/top1", "test/ensemble/top1",
                "test/peers_mean/top1", "train/peers_kl", "train/leader_kl"} <= row.keys()
        assert row["test/peers_mean/top1"] == pytest.approx((row["test/peer0/top1"] + row["test/peer1/top1"]) / 2)
    else:
        branches = [row[f"test/branch{k}/top1"] for k in range(3)]
        assert row["test/net/top1"] == pytest.approx(sum(branches) / 3)  # reported: the mean, not an ensemble
        assert row["test/net/loss"] == pytest.approx(sum(row[f"test/branch{k}/loss"] for k in range(3)) / 3)
        assert ("test/gated/top1" in row) == (kind == "one") and "test/ensemble/top1" in row
        assert on_disk["one"]["method"] == kind and on_disk["one"]["ilr"] == (kind == "clilr")
    best = on_disk["networks"]["net"]
    assert best["best_top1"] == max(r["test/net/top1"] for r in history)
    net = models.load(run_dir / "best_net.pt")  # rebuilt by name
    assert net.checkpoint["arch"] == arch and isinstance(net(torch.zeros(1, 3, 32, 32)), models.BranchOutput)


# --------------------------------------------------------------------------- scripts: smoke mapping, summary

def scripts_module(name):
    import importlib
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    return importlib.import_module(name)


def test_smoke_maps_the_release_networks_to_its_resnet32():
    launch = scripts_module("launch")
    assert launch.METHODS["train_okddip.py"] == "okddip" and launch.METHODS["train_one.py"] == "one"
    flags = launch.smoke_flags(["--dataset", "cifar100", "--recipe", "okddip", "--models", "vgg16", "wrn_20_8",
                                "--backbone", "densenet40_12", "--shared-dense-block"])
    assert flags[:8] == ["--dataset", "digits", "--recipe", "okddip", "--models", "resnet32", "resnet32", "--backbone"]
    assert flags[8] == "resnet32" and "--shared-dense-block" not in flags
    assert launch.smoke_model("clilr:vgg16@3", False) == "clilr:resnet32@3"
    assert launch.smoke_model("okddip:densenet40_12-shared", False) == "okddip:resnet32"
    assert launch.smoke_flags(["--model", "resnet32"])[1] == "wrn_10_1"  # the SwitOKD tables: unchanged


def fake_run(root, method, name, seed, dataset, networks, extra):
    run = root / "okddip_cifar" / method / f"{name}-seed{seed}"
    run.mkdir(parents=True)
    results = {"method": method, "dataset": dataset, "recipe": "okddip", "seed": seed, "status": "finished",
               "epochs": 300, "epochs_planned": 300, "wall_time_s": 1.0,
               "networks": {role: {"arch": arch, "best_top1": best, "final_top1": final}
                            for role, (arch, best, final) in networks.items()}, **extra, "args": {}}
    (run / "results.json").write_text(json.dumps(results))


def test_summarize_prints_the_okddip_table_as_error(tmp_path, capsys):
    summarize = scripts_module("summarize")
    for seed, (leader, ens) in enumerate([(74.0, 76.0), (74.5, 76.5)]):
        fake_run(tmp_path, "okddip", "c100-r32", seed, "cifar100", {"net": ("okddip:resnet32", leader, leader - 1)},
                 {"okddip": {"detach_targets": False}, "measured": {
                     "outputs": {"ensemble": {"top1_at_best": ens, "final_top1": ens - 1, "best_top1": 99.0}},
                     "diversity": {"final": 0.1 * seed}}})
    fake_run(tmp_path, "okddip", "c100-r32-detached", 0, "cifar100", {"net": ("okddip:resnet32", 10.0, 10.0)},
             {"okddip": {"detach_targets": True}})
    fake_run(tmp_path, "dml", "c100-r32-x4", 0, "cifar100", {f"net{k}": ("resnet32", 70.0 + k, 60.0) for k in range(4)},
             {"mutual_learning": {"peer_target": "mean-logits", "detach_targets": False, "kl": "okddip", "tau": 3.0},
              "measured": {"cohort_mean": {"best_top1": 72.0, "final_top1": 71.0}}})
    fake_run(tmp_path, "one", "c10-r32-one", 0, "cifar10", {"net": ("one:resnet32", 93.0, 92.0)},
             {"one": {"ilr": False, "detach_targets": False}})
    fake_run(tmp_path, "vanilla", "c10-r32", 0, "cifar10", {"student": ("resnet32", 92.0, 91.5)}, {})
    for form, best in (("okddip", 94.0), ("table1", 50.0)):  # only the release's KD is in the table
        fake_run(tmp_path, "kd", f"c10-r32-from-r110-{form}", 0, "cifar10", {"student": ("resnet32", best, best)},
                 {"kd": {"form": form}, "teacher": {"arch": "resnet110"}})
    assert summarize.main([str(tmp_path), "--csv"]) == 0
    cells = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))
             if r["table"] == "okddip_cifar"}
    okddip = cells[("ResNet-32: OKDDip (leader) [quoted]", "CIFAR-100")]
    assert okddip["metric"] == "error" and okddip["n"] == "2"  # the detached run is in no cell
    assert float(okddip["best_mean"]) == pytest.approx(25.75) and float(okddip["final_mean"]) == pytest.approx(26.75)
    assert float(okddip["paper"]) == 25.65 and float(okddip["paper_std"]) == 0.15
    assert float(okddip["best_minus_paper"]) == pytest.approx(0.10)
    ensemble = cells[("ResNet-32: OKDDip ensemble (peers)", "CIFAR-100")]  # at the reported metric's best epoch
    assert float(ensemble["best_mean"]) == pytest.approx(23.75)
    assert float(ensemble["final_mean"]) == pytest.approx(24.75)
    dml = cells[("ResNet-32: DML, 4 networks (mean)", "CIFAR-100")]
    assert float(dml["best_mean"]) == pytest.approx(28.0) and float(dml["final_mean"]) == pytest.approx(29.0)
    assert float(cells[("ResNet-32: ONE (mean of branches)", "CIFAR-10")]["best_mean"]) == pytest.approx(7.0)
    assert float(cells[("ResNet-32: Baseline", "CIFAR-10")]["best_mean"]) == pytest.approx(8.0)
    kd = cells[("ResNet-32: KD from ResNet-110 (the release's train_kd.py)", "CIFAR-10")]
    assert kd["n"] == "1" and float(kd["best_mean"]) == pytest.approx(6.0)
    assert summarize.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "Top-1 ERROR %" in text and "25.75 ± 0.35 / 26.75 ± 0.35 (n=2) · paper 25.65 ± 0.15 (+0.10)" in text


@pytest.mark.parametrize("kind", ["okddip", "one"])
def test_evaluate_reproduces_the_reported_metric(tmp_path, kind):
    """evaluate.py on a multi-branch run: every branch, and the reported one (leader / branch mean)."""
    import evaluate
    module, folder, flags = RUNS[kind]
    results = module.main([*run_flags(kind), "--epochs", "1", "--out", str(tmp_path), "--run-name", "r"])
    report = evaluate.main([str(tmp_path / folder / "r"), "--json"])
    assert report["networks"]["net"]["top1"] == pytest.approx(results["networks"]["net"]["best_top1"], abs=0.01)
    assert sorted(report["branches"]) == [f"net/branch{k}" for k in range(3)]

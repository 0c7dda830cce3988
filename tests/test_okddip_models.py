"""OKDDip-paper networks (models/okddip.py): parameter counts against table 1.9 of
docs/OKDDIP.md R1.9, output layout, attention, ONE gate, ILR, deployment."""
import copy

import pytest
import torch
import torch.nn.functional as F

import models
from models.okddip import (BACKBONES, METHODS, BranchOutput, ScaleGradient, build_branched, build_network_based,
                           build_okddip, build_okddip_backbone, okddip_names)

# R1.9, C = 100, m = 4: baseline, OKDDip BB, ONE, CL-ILR, Ind, network-based OKDDip
TABLE_1_9 = {
    "resnet32": (472_756, 1_554_272, 1_553_388, 1_553_248, 1_553_388, 1_892_048),
    "resnet110": (1_170_868, 3_874_016, 3_858_156, 3_857_632, 3_858_156, 4_699_856),
    "wrn_20_8": (6_871_220, 22_611_936, 22_596_076, 22_595_552, 22_596_076, 27_501_264),
    "vgg16": (15_299_748, 38_342_608, 38_279_132, 38_277_072, 38_279_132, 61_264_528),
    "densenet40_12": (188_092, 409_048, 405_076, 404_824, 405_076, 756_592),
}
DENSENET_SHARED = {"okddip": 233_008, "one": 229_036, "clilr": 228_784, "ind": 229_036}  # the release's bug
COLUMNS = ("baseline",) + METHODS + ("okddip-net",)
EXPECTED_100 = {f"{method}:{backbone}": row[i]
                for backbone, row in TABLE_1_9.items() for i, method in enumerate(COLUMNS)}
EXPECTED_100.update({f"{method}:densenet40_12-shared": n for method, n in DENSENET_SHARED.items()})
# R1.8, C = 1000 (the network-based row is 4 baselines + query/key 2 * 512 * 64)
IMAGENET_1000 = {"baseline:resnet18": 11_689_512, "baseline:resnet34": 21_797_672, "okddip:resnet34": 83_212_512,
                 "one:resnet34": 83_147_500, "ind:resnet34": 83_147_500, "clilr:resnet34": 83_146_976,
                 "okddip-net:resnet34": 4 * 21_797_672 + 65_536}
NAMES = dict(okddip_names())


def count(model):
    return sum(p.numel() for p in model.parameters())


def build_meta(num_classes, **kwargs):
    with torch.device("meta"):
        return build_okddip(num_classes, **kwargs)


def kl_t(teacher, student, T=3.0):
    """utils.KL_Loss of the release (docs/OKDDIP.md R0): nothing detached."""
    p = F.softmax(teacher / T, dim=1) + 1e-7
    return T * T * (p * (p.log() - F.log_softmax(student / T, dim=1))).sum(1).mean()


def test_names_cover_table_and_are_unique():
    names = [name for name, _ in okddip_names()]
    assert len(names) == len(set(names))
    assert set(EXPECTED_100) | set(IMAGENET_1000) <= set(names)
    cifar = [n for n in names if not n.endswith(("resnet18", "resnet34"))]
    assert [n for n, _ in okddip_names(imagenet=False)] == cifar


@pytest.mark.parametrize("name", sorted(EXPECTED_100))
def test_parameter_count_cifar100(name):
    assert count(build_meta(100, **NAMES[name])) == EXPECTED_100[name]


@pytest.mark.parametrize("name,heads,d", [("okddip:resnet32", 4, 64), ("one:vgg16", 4, 512),
                                          ("baseline:densenet40_12", 1, 132), ("okddip-net:resnet110", 4, 256),
                                          ("clilr:densenet40_12-shared", 4, 132), ("ind:wrn_20_8", 4, 256)])
def test_parameter_count_cifar10_differs_only_in_heads(name, heads, d):
    assert count(build_meta(10, **NAMES[name])) == EXPECTED_100[name] - heads * 90 * (d + 1)


@pytest.mark.parametrize("name", sorted(IMAGENET_1000))
def test_parameter_count_imagenet(name):
    assert count(build_meta(1000, **NAMES[name])) == IMAGENET_1000[name]


@pytest.mark.parametrize("method,expected", [("clilr", 62_697_208), ("okddip", 62_762_744), ("one", 62_697_601)])
def test_imagenet_three_branches_as_the_pyc_default(method, expected):
    with torch.device("meta"):
        assert count(build_branched("resnet34", 1000, method, branches=3)) == expected


def test_imagenet_baseline_is_torchvision():
    from torchvision.models import ResNet

    with torch.device("meta"):
        assert isinstance(build_okddip_backbone("resnet18", 1000), ResNet)


@pytest.mark.parametrize("backbone", ["resnet32", "vgg16", "wrn_20_8", "resnet34"])
def test_deployed_branch_is_the_baseline(backbone):
    with torch.device("meta"):
        model = build_branched(backbone, 100, "okddip")
        baseline = count(build_okddip_backbone(backbone, 100))
    assert count(model.deployed()) == count(model.deployed(0)) == baseline
    if backbone == "resnet32":
        assert baseline == 472_756


def test_deployed_leader_computes_the_leader_logits():
    torch.manual_seed(0)
    model = build_branched("resnet32", 100, "okddip").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.deployed()(x), model(x).logits[-1], rtol=0, atol=0)


def test_densenet_shared_block_is_one_object():
    shared = build_branched("densenet40_12", 100, "okddip", shared_dense_block=True)
    separate = build_branched("densenet40_12", 100, "okddip")
    assert all(b.body[0] is shared.branches[0].body[0] for b in shared.branches)
    assert len({id(b.body[0]) for b in separate.branches}) == 4
    assert count(separate) - count(shared) == 3 * 58_680
    # per-branch BN and classifier stay separate in the shared version
    assert len({id(b.body[1]) for b in shared.branches}) == len({id(b.classifier) for b in shared.branches}) == 4
    with pytest.raises(ValueError):
        build_branched("resnet32", 100, "one", shared_dense_block=True)


@pytest.mark.parametrize("name", ["okddip:resnet32", "one:resnet32", "clilr:resnet32", "ind:resnet32",
                                  "okddip-net:resnet32", "okddip:densenet40_12-shared", "one:vgg16"])
def test_output_layout_and_every_used_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = build_okddip(10, **NAMES[name]).eval()
    x = torch.randn(3, 3, 32, 32)
    method = NAMES[name]["method"]
    branches = model.nets if method == "okddip-net" else model.branches
    with torch.no_grad():  # eval: VGG's dropout off
        out = model(x)
        for k, branch in enumerate(branches):  # logits[k] is branch k's classifier applied to features[k]
            head = branch.branch.classifier if method == "okddip-net" else branch.classifier
            torch.testing.assert_close(head(out.features[k]), out.logits[k])
    out = model.train()(x)
    assert isinstance(out, BranchOutput)
    d = out.features.shape[-1]
    assert out.logits.shape == (4, 3, 10) and out.features.shape == (4, 3, d)
    assert (out.attention is None) == (method not in ("okddip", "okddip-net"))
    assert (out.gate is None) == (method != "one")
    loss = out.logits.square().sum()
    if out.attention is not None:
        assert out.attention.shape == (3, 3, 3)
        loss = loss + torch.einsum("bij,jbc->ibc", out.attention, out.logits[:-1]).square().sum()
    if out.gate is not None:
        assert out.gate.shape == (3, 4)
        loss = loss + torch.einsum("bk,kbc->bc", out.gate, out.logits).square().sum()
    loss.backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    assert unused == ({n for n, _ in model.named_parameters() if n.startswith("gate.")} if method == "ind" else set())
    if method == "ind":
        assert len(unused) == 4  # Linear(32, 4) weight + bias, BatchNorm1d(4) weight + bias


def test_okddip_attention_matches_the_formula_and_trains_query_key():
    torch.manual_seed(0)
    model = build_branched("resnet32", 100, "okddip").train()
    y = torch.randint(0, 100, (4,))
    out = model(torch.randn(4, 3, 32, 32))
    peers = out.features[:3]  # the leader (index 3) is outside the attention
    q = peers @ model.attention.query.weight.T
    k = peers @ model.attention.key.weight.T
    energy = torch.einsum("ibe,jbe->bij", q, k)  # unscaled dot product, self included
    torch.testing.assert_close(out.attention, energy.softmax(-1))
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(4, 3))
    assert model.attention.query.weight.shape == (8, 64) and model.attention.query.bias is None

    def loss_of(out, detach):
        targets = torch.einsum("bij,jbc->ibc", out.attention, out.logits[:3])  # x_i = sum_j A_ij z_j
        targets = targets.detach() if detach else targets
        loss = sum(F.cross_entropy(z, y) for z in out.logits)
        leader = kl_t(out.logits[:3].mean(0), out.logits[3])  # leader target: mean of the peers' logits
        return loss + sum(kl_t(targets[i], out.logits[i]) for i in range(3)) + leader

    loss_of(out, detach=False).backward()
    for w in (model.attention.query.weight, model.attention.key.weight):
        assert w.grad is not None and w.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    loss_of(model(torch.randn(4, 3, 32, 32)), detach=True).backward()  # control: detached targets freeze W_Q, W_K
    assert model.attention.query.weight.grad is None and model.attention.key.weight.grad is None


def test_one_gate_on_the_simplex_with_relu_scores():
    torch.manual_seed(0)
    model = build_branched("resnet32", 100, "one").train()
    seen = []
    model.gate.register_forward_hook(lambda module, inp, out: seen.append(out))
    out = model(torch.randn(8, 3, 32, 32))
    (scores,) = seen
    assert scores.shape == (8, 4) and (scores >= 0).all() and (scores == 0).any()  # ReLU after BN1d
    torch.testing.assert_close(out.gate, scores.softmax(1))
    torch.testing.assert_close(out.gate.sum(1), torch.ones(8))
    gate_linear = model.gate[2]
    assert gate_linear.in_features == 32 and gate_linear.bias is not None


def test_scale_gradient_function():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = ScaleGradient.apply(x, 4)
    assert torch.equal(y, x)
    (y * torch.arange(5.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0, dtype=torch.float64) / 4)


@pytest.mark.parametrize("method", ["clilr", "one"])
def test_ilr_scales_only_the_trunk_gradient(method):
    torch.manual_seed(0)
    plain = build_branched("resnet32", 10, method, ilr=False).double().train()
    scaled = copy.deepcopy(plain)
    scaled.ilr = True
    assert build_branched("resnet32", 10, "clilr").ilr and not build_branched("resnet32", 10, "one").ilr
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    for model in (plain, scaled):
        out = model(x)
        z = out.logits
        if method == "clilr":  # x_k = mean of the other branches' logits
            loss = sum(F.cross_entropy(z[k], y) + kl_t((z.sum(0) - z[k]) / 3, z[k]) for k in range(4))
        else:
            ensemble = torch.einsum("bk,kbc->bc", out.gate, z)
            loss = sum(F.cross_entropy(z[k], y) + kl_t(ensemble, z[k]) for k in range(4)) + F.cross_entropy(ensemble, y)
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), scaled.parameters()):
        if name.startswith("trunk."):
            assert torch.equal(q.grad, p.grad / 4), name
        else:
            assert torch.equal(q.grad, p.grad), name
    assert any(p.grad.abs().sum() > 0 for n, p in plain.named_parameters() if n.startswith("trunk."))


def test_network_based_nets_are_independent_baselines():
    model = build_network_based("resnet32", 100)
    assert all(count(net) == 472_756 for net in model.nets)
    assert model.deployed() is model.nets[-1]
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))


def test_initialisation_follows_the_release():
    torch.manual_seed(0)
    vgg_gl, vgg_one = build_branched("vgg16", 100, "okddip"), build_branched("vgg16", 100, "one")
    assert vgg_gl.attention.query.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert vgg_gl.branches[0].classifier[0].bias.abs().sum() > 0  # vgg_GL.py keeps default Linear biases
    assert vgg_one.branches[0].classifier[0].bias.abs().sum() == 0 and vgg_one.gate[2].bias.abs().sum() == 0
    assert vgg_one.trunk[0].bias.abs().sum() == 0
    dense = build_branched("densenet40_12", 100, "one")
    assert dense.branches[0].classifier.bias.abs().sum() == 0 and dense.gate[2].bias.abs().sum() == 0
    for name in ("okddip:densenet40_12", "okddip:densenet40_12-shared"):  # densenet_GL.py zeroes them too
        linears = [m for m in models.build(name, 100).modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) >= 6 and all(m.bias is None or m.bias.abs().sum() == 0 for m in linears), name
    # conv std: Kaiming with ReLU gain, fan_out for ResNet, fan_in for DenseNet
    conv = build_okddip_backbone("resnet32", 100).branch.body[0][0].body[0]  # 3x3, 32 -> 64
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    conv = dense.branches[0].body[0][0].body[2]  # 1x1, 60 -> 48
    assert conv.weight.std().item() == pytest.approx((2 / 60) ** 0.5, rel=0.1)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        build_branched("resnet32", 100, "dml")
    with pytest.raises(ValueError):
        build_branched("resnet20", 100, "one")
    with pytest.raises(ValueError):
        build_branched("resnet32", 100, "one", branches=1)
    with pytest.raises(ValueError):
        build_okddip(100, method="okddip-net", backbone="densenet40_12", shared_dense_block=True)
    assert set(BACKBONES) == {"resnet32", "resnet110", "wrn_20_8", "vgg16", "densenet40_12", "resnet18", "resnet34"}


def test_imagenet_branched_forward():
    torch.manual_seed(0)
    model = build_branched("resnet18", 7, "okddip").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (4, 1, 7) and out.features.shape == (4, 1, 512) and out.attention.shape == (1, 3, 3)

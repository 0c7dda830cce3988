"""models.features: the stages, pre-pool map and embedding of every zoo network (against
hand-written forwards), through torch.compile, DistributedDataParallel, channels_last
and bf16 autocast, and the teacher-student stage pairing of the paper's pairs."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

import models
from models.features import FeatureExtractor, find_features, match_stages, unwrap


def pyramid(channels, size):
    """Stage shapes: ``channels`` per stage, the first at ``size`` px, each next one halved."""
    return [(c, size >> k, size >> k) for k, c in enumerate(channels)]


CIFAR_RESNET, RESNET, WRN_16_2 = (16, 32, 64), (64, 128, 256, 512), (32, 64, 128)
# (name, image_size): stage shapes (C, H, W) at the network's native sizes
STAGES = {
    **{(f"resnet{d}", 32): pyramid(CIFAR_RESNET, 32) for d in (20, 32, 44, 56, 110)},
    ("resnet20", 64): pyramid(CIFAR_RESNET, 64),
    **{(f"resnet{d}", s): pyramid(RESNET, s) for d in (18, 34) for s in (32, 64)},
    **{(f"resnet{d}", 224): pyramid(RESNET, 56) for d in (18, 34)},   # the 112 px stem is no stage
    ("wrn_16_1", 32): pyramid((16, 32, 64), 32),
    ("wrn_16_2", 32): pyramid(WRN_16_2, 32),
    ("wrn_16_2", 64): pyramid(WRN_16_2, 64),
    ("wrn_16_4", 32): pyramid((64, 128, 256), 32),
    ("wrn_16_8", 32): pyramid((128, 256, 512), 32),
    ("wrn_16_10", 32): pyramid((160, 320, 640), 32),
    ("wrn_40_2", 32): pyramid(WRN_16_2, 32),
    ("mobilenet", 32): pyramid((64, 128, 256, 512, 1024), 32),
    ("mobilenetv2", 32): pyramid((24, 32, 96, 320), 16),     # the last: the last block's, before the 1x1 head
    ("mobilenetv2_0.5", 32): pyramid((12, 16, 48, 160), 16),
    ("mobilenetv2_1.4", 32): pyramid((33, 44, 134, 448), 16),
    ("mobilenetv2_1.4", 64): pyramid((24, 32, 48, 136, 448), 32),   # the released torchvision-style layout
    ("mobilenetv2", 224): pyramid((16, 24, 32, 96, 320), 112),       # torchvision's
    ("mobilenetv2_0.5", 224): pyramid((8, 16, 16, 48, 160), 112),
}
HEAD = {"mobilenetv2": 1280, "mobilenetv2_0.5": 1280, "mobilenetv2_1.4": 1792}
"""Channels of pre_pool where a head convolution follows the last stage (elsewhere pre_pool has the last
stage's shape: the map itself, or the same map after a final BN-ReLU)."""


def stage_shapes(features):
    return [f.shape for name, f in features.items() if name.startswith("stage")]


def final_linear(model, features):
    linear = model.get_submodule(features["embedding"].module)
    assert isinstance(linear, nn.Linear)
    return linear


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name,size", list(STAGES))
def test_stage_table(name, size):
    model = models.build(name, 100, size)
    features = find_features(model, size)
    assert stage_shapes(features) == STAGES[name, size]
    last = STAGES[name, size][-1]
    assert features["pre_pool"].shape == (HEAD.get(name, last[0]), *last[1:])
    assert features["embedding"].shape == (final_linear(model, features).in_features,)
    assert final_linear(model, features).out_features == 100


def test_every_zoo_network_has_a_stage_table():
    assert {name for name, size in STAGES if size == 32} == set(models.names())


@pytest.mark.parametrize("name", models.names())
def test_features_of_a_training_forward(name):
    """Any zoo network (also one added later): the features are those of the very forward."""
    torch.manual_seed(0)
    model = models.build(name, 10).train()
    reference = copy.deepcopy(model)
    extractor = FeatureExtractor(model, 32)
    x = torch.randn(2, 3, 32, 32)
    logits, feats = extractor(x)
    torch.testing.assert_close(logits, reference(x))
    assert {k: v.shape[1:] for k, v in feats.items()} == {k: f.shape for k, f in extractor.available.items()}
    sizes = [v.shape[-1] for k, v in feats.items() if k.startswith("stage")]
    assert len(sizes) >= 3 and sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    torch.testing.assert_close(final_linear(model, extractor.available)(feats["embedding"]), logits)
    assert feats["pre_pool"].dim() == 4
    extractor.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _sequential_stages(features, ends):
    return lambda model, x: [features(model)[:end](x) for end in ends]


def _resnet_stages(model, x):
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        out.append(h := layer(h))
    return out


# Each stage by hand, from the architecture: the last block of each resolution; then the map the
# classifier pools (pre_pool), with the stages' last entry when no head follows the last block
BY_HAND = {
    ("resnet20", 32): lambda m, x: [m.layers[:end](m.stem(x)) for end in (3, 6, 9)],
    ("wrn_16_2", 32): _sequential_stages(lambda m: m.features, (3, 5, 7, 9)),   # group sums; BN-ReLU
    ("wrn_40_2", 32): _sequential_stages(lambda m: m.features, (7, 13, 19, 21)),
    ("mobilenet", 32): _sequential_stages(lambda m: m.features, (3, 7, 11, 23, 27)),
    ("mobilenetv2_0.5", 32): _sequential_stages(lambda m: m.features, (6, 9, 16, 20, 23)),   # 1x1 head conv
    ("mobilenetv2_0.5", 224): _sequential_stages(lambda m: m.features, (2, 4, 7, 14, 18, 19)),
    ("resnet18", 32): _resnet_stages,
    ("resnet18", 224): _resnet_stages,
}
WITH_HEAD = {("wrn_16_2", 32), ("wrn_40_2", 32), ("mobilenetv2_0.5", 32), ("mobilenetv2_0.5", 224)}


@pytest.mark.parametrize("name,size", list(BY_HAND))
def test_stages_are_the_block_outputs(name, size):
    torch.manual_seed(0)
    model = models.build(name, 10, size).eval()
    extractor = FeatureExtractor(model, size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits, feats = extractor(x)
        expected = BY_HAND[name, size](model, x)
        stages, pre_pool = (expected[:-1], expected[-1]) if (name, size) in WITH_HEAD else (expected, expected[-1])
        embedding = F.adaptive_avg_pool2d(pre_pool, 1).flatten(1)
    assert len(stages) == len([k for k in feats if k.startswith("stage")])
    for k, stage in enumerate(stages, 1):
        torch.testing.assert_close(feats[f"stage{k}"], stage)
    torch.testing.assert_close(feats["pre_pool"], pre_pool)
    torch.testing.assert_close(feats["embedding"], embedding)


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("wrn_16_1", 32), ("mobilenetv2", 224)])
def test_probe_leaves_the_network_alone(name, size):
    model = models.build(name, 10, size).train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()   # a frozen BatchNorm
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    find_features(model, size)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():   # BatchNorm statistics and batch counters
        assert torch.equal(value, state[key]), key
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_1", "mobilenetv2_0.5"])
def test_a_stage_loss_trains_the_network(name):
    torch.manual_seed(0)
    model = models.build(name, 10).train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    extractor = FeatureExtractor(model, 32, ["stage2"])
    _, feats = extractor(x)
    feats["stage2"].pow(2).mean().backward()

    f = extractor.available["stage2"]
    seen = []
    reference.get_submodule(f.module).register_forward_hook(lambda m, a, out: seen.append(out))
    reference(x)
    seen[f.call].pow(2).mean().backward()
    reached = 0
    for (key, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
            reached += bool(p.grad.abs().sum())
    assert reached > 4
    assert final_linear(model, extractor.available).weight.grad is None   # nothing past stage2


@pytest.mark.parametrize("name", ["resnet18", "wrn_16_1", "mobilenetv2_0.5"])
def test_channels_last_and_bf16_autocast(name):
    torch.manual_seed(0)
    model = models.build(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    _, fp32 = FeatureExtractor(copy.deepcopy(model), 32)(x)
    model = model.to(memory_format=torch.channels_last)
    extractor = FeatureExtractor(model, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, feats = extractor(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(final_linear(model, extractor.available)(feats["embedding"]), logits)
    for key, value in feats.items():
        assert value.dtype == torch.bfloat16, key
        assert value.dim() == 2 or value.is_contiguous(memory_format=torch.channels_last), key
        scale = fp32[key].abs().max().item()
        torch.testing.assert_close(value.float(), fp32[key], rtol=0.05, atol=0.05 * scale)
    sum(v.float().pow(2).mean() for v in feats.values()).backward()
    classifier = set(final_linear(model, extractor.available).parameters())
    for p in model.parameters():   # every parameter before the classifier, in fp32
        assert (p.grad is None) == (p in classifier)
        assert p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())


def _train_step(extractor, x, y):
    logits, feats = extractor(x)
    (F.cross_entropy(logits, y) + feats["stage2"].pow(2).mean() + feats["embedding"].pow(2).mean()).backward()
    return logits.detach(), {k: v.detach() for k, v in feats.items()}


def _assert_same_step(model, reference, wrap, extra_steps=1):
    """``wrap(model)`` run through the extractor gives the plain reference's features and gradients."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    net = wrap(model)
    assert unwrap(net) is model
    extractor = FeatureExtractor(net, 32, ["stage2", "embedding"])
    plain = FeatureExtractor(reference, 32, ["stage2", "embedding"])
    for _ in range(1 + extra_steps):
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        logits, feats = _train_step(extractor, x, y)
        ref_logits, ref_feats = _train_step(plain, x, y)
        torch.testing.assert_close(logits, ref_logits)
        for key in feats:
            torch.testing.assert_close(feats[key], ref_feats[key])
        for (key, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=key)
        with torch.no_grad():
            net(x)   # a forward outside the extractor (evaluation) stores nothing
        assert not any(extractor._seen.values())
    return net, extractor


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    torch.manual_seed(0)
    model = models.build("wrn_16_1", 10).train()
    _assert_same_step(model, copy.deepcopy(model), lambda m: torch.compile(m, backend=backend))


def test_compiled_network_run_before_its_extractor_is_never_silently_stale():
    model = models.build("resnet20", 10).eval()
    net = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    net(x)
    extractor = FeatureExtractor(net, 32, ["stage1"])
    try:
        _, feats = extractor(x)
    except RuntimeError as e:
        assert "before its FeatureExtractor" in str(e)
    else:   # a torch that traces late hooks: then they must be right
        torch.testing.assert_close(feats["stage1"], model.layers[:3](model.stem(x)))


@pytest.mark.parametrize("compiled", [False, True], ids=["ddp", "compiled-ddp"])
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin")
def test_distributed_data_parallel(compiled, tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = models.build("resnet20", 10).train()
        reference = copy.deepcopy(model)

        def wrap(m):
            ddp = nn.parallel.DistributedDataParallel(m)
            return torch.compile(ddp, backend="aot_eager") if compiled else ddp

        net, extractor = _assert_same_step(model, reference, wrap)
        assert extractor.available == find_features(net, 32)
    finally:
        dist.destroy_process_group()


def _vgg(cfg):
    layers, cin = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


OTHER_CNNS = {   # name: (builder, image size, stage shapes, pre_pool shape)
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 64,
                 pyramid((256, 512, 1024, 2048), 16), (2048, 2, 2)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 224,   # SE branches
                           pyramid((16, 24, 48, 96), 56), (576, 7, 7)),           # 1x1 head conv
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), 64,
                    pyramid((256, 512, 1024, 1024), 16), (1024, 2, 2)),
    "vgg11_bn_cifar": (lambda: _vgg([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]), 32,
                       pyramid((64, 128, 256, 512, 512), 32), (512, 2, 2)),
    "vgg_pool_last": (lambda: _vgg([64, 64, "M", 128, 128, "M", 256, 256, "M", 512, "M"]), 32,
                      pyramid((64, 128, 256, 512), 32), (512, 2, 2)),   # pre_pool after the last max-pool
}


@pytest.mark.parametrize("name", list(OTHER_CNNS))
def test_other_conv_bn_relu_networks(name):
    build, size, stages, pre_pool = OTHER_CNNS[name]
    torch.manual_seed(0)
    model = build().eval()
    extractor = FeatureExtractor(model, size)
    assert stage_shapes(extractor.available) == stages
    assert extractor.available["pre_pool"].shape == pre_pool
    with torch.no_grad():
        logits, feats = extractor(torch.randn(1, 3, size, size))
        torch.testing.assert_close(final_linear(model, extractor.available)(feats["embedding"]), logits)
    assert {k: v.shape[1:] for k, v in feats.items()} == {k: f.shape for k, f in extractor.available.items()}


# the paper's teacher -> student pairs: (teacher, student, classes, image size, (teacher, student) stages)
SAME = [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]
PAIRS = [
    ("wrn_40_2", "wrn_16_2", 100, 32, SAME),
    ("wrn_16_2", "mobilenetv2_0.5", 100, 32, [("stage2", "stage1"), ("stage3", "stage2")]),
    ("wrn_16_2", "resnet32", 100, 32, SAME),
    ("wrn_16_8", "wrn_16_1", 10, 32, SAME),
    ("wrn_16_10", "resnet20", 100, 32, SAME),
    ("resnet34", "mobilenetv2_1.4", 200, 64,
     [("stage2", "stage1"), ("stage3", "stage2"), ("stage4", "stage3")]),
    ("wrn_16_2", "resnet20", 200, 64, SAME),
    ("resnet34", "resnet18", 1000, 224, SAME + [("stage4", "stage4")]),
    ("resnet18", "mobilenetv2_0.5", 1000, 224,
     [("stage1", "stage2"), ("stage2", "stage3"), ("stage3", "stage4"), ("stage4", "stage5")]),
]


@pytest.mark.parametrize("teacher,student,classes,size,expected", PAIRS)
def test_match_stages_on_the_paper_pairs(teacher, student, classes, size, expected):
    t = find_features(models.build(teacher, classes, size), size)
    s = find_features(models.build(student, classes, size), size)
    pairs = match_stages(t, s)
    assert pairs == expected
    for t_stage, s_stage in pairs:
        assert t[t_stage].shape[1:] == s[s_stage].shape[1:]
    assert match_stages(t, s, stages=[expected[-1][1]]) == expected[-1:]


def test_match_stages_errors():
    t = find_features(models.build("wrn_16_2", 100), 32)
    s = find_features(models.build("mobilenetv2_0.5", 100), 32)
    with pytest.raises(ValueError, match=r"student stage4.*teacher: stage1 32x32.*student: .*stage4 2x2"):
        match_stages(t, s, stages=["stage4"])
    with pytest.raises(ValueError, match="stage9"):
        match_stages(t, s, stages=["stage9"])
    with pytest.raises(ValueError, match="no teacher stage"):
        match_stages({"stage1": (64, 7, 7)}, {"stage1": (8, 112, 112), "embedding": (1280,)})
    assert match_stages({"stage1": (64, 7, 7)}, {"stage3": (96, 7, 7)}) == [("stage1", "stage3")]


def test_unknown_feature_name():
    with pytest.raises(KeyError, match="stage4"):
        FeatureExtractor(models.build("resnet20", 10), 32, ["stage4"])

"""Tests for ``variant="official"``: the released model files of hfutqian/SwitOKD, and ``script_init``."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import models
import utils

ROOT = Path(__file__).resolve().parents[1]

# (name, num_classes, image_size, parameters of the released model file)
OFFICIAL_PARAMS = [
    ("wrn_16_2", 100, 32, 704_420),
    ("mobilenetv2_0.5", 100, 32, 812_836),
    ("wrn_16_10", 100, 32, 17_179_940),
    ("mobilenet", 100, 32, 3_309_476),
    ("wrn_16_8", 10, 32, 10_965_866),
    ("wrn_16_1", 10, 32, 175_626),
    ("resnet20", 10, 32, 269_722),
    ("resnet20", 200, 64, 282_072),
    ("resnet34", 200, 64, 21_379_592),
    ("mobilenetv2_1.4", 200, 64, 4_674_376),
]


@pytest.mark.parametrize("name,num_classes,image_size,expected", OFFICIAL_PARAMS)
def test_official_parameter_count_and_shape(name, num_classes, image_size, expected):
    torch.manual_seed(0)
    model = models.build(name, num_classes, image_size, variant="official").eval()
    assert models.count_parameters(model) == expected
    with torch.no_grad():
        out = model(torch.randn(2, 3, image_size, image_size))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


def test_official_wrn16_adds_exactly_the_conv_biases():
    # WRN-16-2: stem 16; per stage two blocks of two convs plus one projection shortcut,
    # 32/64/128 channels: 16 + 5*32 + 5*64 + 5*128 = 1136 biases more than the bias-free paper network
    paper = models.count_parameters(models.build("wrn_16_2", 100))
    assert models.count_parameters(models.build("wrn_16_2", 100, variant="official")) - paper == 1136


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_official_wrn_structure():
    model = models.build("wrn_16_2", 100, variant="official")
    assert all(c.bias is not None for c in _convs(model))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns[-1].momentum == 0.9 and all(bn.momentum == 0.1 for bn in bns[:-1])
    blocks = [m for m in model.modules() if hasattr(m, "shortcut")]
    assert len(blocks) == 6
    down = [b for b in blocks if b.shortcut is not None and b.shortcut.stride == (2, 2)]
    assert len(down) == 2
    assert all(b.conv1.stride == (1, 1) and b.conv2.stride == (2, 2) for b in down)


@pytest.mark.parametrize("variant,raw", [("official", True), ("paper", False)])
def test_projection_shortcut_input(variant, raw):
    """The released WRN's 1x1 shortcut takes the raw block input; the paper WRN's the pre-activated one."""
    model = models.build("wrn_16_2", 10, variant=variant).eval()
    block = [m for m in model.modules() if getattr(m, "shortcut", None) is not None][0]
    seen = []
    block.shortcut.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.randn(2, block.bn1.num_features, 8, 8)
    with torch.no_grad():
        block(x)
    assert torch.equal(seen[0], x) is raw


def test_official_wrn_initialisation():
    torch.manual_seed(0)
    model = models.build("wrn_16_10", 100, variant="official")
    for conv in _convs(model):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(2) * math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound
        assert torch.count_nonzero(conv.bias) == 0
    big = max(_convs(model), key=lambda c: c.weight.numel())  # 640 -> 640, 3x3: bound sqrt(2)*sqrt(6/11520)
    assert big.weight.std().item() == pytest.approx(math.sqrt(2) * math.sqrt(6 / 11520) / math.sqrt(3), rel=0.01)
    fc = model.fc  # the released conv_init skips the Linear: PyTorch default, U(+-1/sqrt(640))
    assert fc.weight.abs().max() <= 1 / math.sqrt(640) and torch.count_nonzero(fc.bias) > 0
    assert fc.bias.abs().max() <= 1 / math.sqrt(640)


def test_official_wrn_other_depths_follow_wrn_40_2_file():
    official = models.build("wrn_40_2", 100, variant="official")
    assert models.count_parameters(official) == models.count_parameters(models.build("wrn_40_2", 100)) == 2_255_156
    assert torch.count_nonzero(official.fc.bias) == 0
    assert all(c.bias is None for c in _convs(official))


@pytest.mark.parametrize("variant,linear_std", [("official", 0.01), ("paper", 1 / math.sqrt(3 * 1280))])
def test_cifar_mobilenetv2_initialisation(variant, linear_std):
    torch.manual_seed(0)
    model = models.build("mobilenetv2_0.5", 100, variant=variant)
    assert model.fc.weight.std().item() == pytest.approx(linear_std, rel=0.02)  # 128,000 draws
    if variant == "official":
        assert torch.count_nonzero(model.fc.bias) == 0
    last = [c for c in _convs(model) if c.kernel_size == (1, 1)][-1]  # 160 -> 1280: He fan_out sqrt(2/1280)
    assert last.out_channels == 1280
    assert last.weight.std().item() == pytest.approx(math.sqrt(2 / 1280), rel=0.02)


@pytest.mark.parametrize("variant,fan", [("official", 144), ("paper", 288)])
def test_resnet20_initialisation(variant, fan):
    """Released resnet20.py: kaiming_normal_ with fan_in on Conv and Linear; paper: fan_out on Conv."""
    torch.manual_seed(0)
    model = models.build("resnet20", 100, variant=variant)
    conv = next(c for c in _convs(model) if c.in_channels == 16 and c.out_channels == 32)  # fan_in 144, fan_out 288
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan), rel=0.05)
    if variant == "official":
        assert model.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)


def test_official_resnet34_keeps_pytorch_default_initialisation():
    torch.manual_seed(0)
    model = models.build("resnet34", 200, 64, variant="official")
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.kernel_size == (3, 3)
    for conv in _convs(model):
        fan_in = conv.weight[0].numel()
        assert conv.weight.abs().max() <= 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) bound
    big = _convs(model)[-2]  # 512 -> 512, 3x3: uniform std 1/sqrt(3 * 4608)
    assert big.weight.shape == (512, 512, 3, 3)
    assert big.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 4608), rel=0.01)
    assert torch.count_nonzero(model.fc.bias) > 0


def test_official_resnet18_small_input_is_not_released():
    with pytest.raises(ValueError, match=r"'resnet18' has no official architecture") as err:
        models.build("resnet18", 100, 32, variant="official")
    assert isinstance(err.value, models.NoOfficialArchitecture)
    assert models.count_parameters(models.build("resnet18", 1000, 224, variant="official")) == 11_689_512


@pytest.mark.parametrize("variant", ["Official", "released", ""])
def test_bad_variant_raises(variant):
    with pytest.raises(ValueError) as err:
        models.build("wrn_16_2", 100, variant=variant)
    msg = str(err.value)
    assert repr(variant) in msg and "paper" in msg and "official" in msg and "\n" not in msg
    assert models.VARIANTS == ("paper", "official", "okddip", "crd")


@pytest.mark.parametrize("depth,paper", [(20, 275_572), (32, 470_004), (56, 858_868), (110, 1_733_812)])
def test_crd_variant_is_repdistillers_resnet(depth, paper):
    """Option A (He et al.) by default; RepDistiller's 1x1-conv + BN projection under variant crd."""
    option_a, option_b = (models.build(f"resnet{depth}", 100, variant=v) for v in ("paper", "crd"))
    assert models.count_parameters(option_a) == paper
    assert models.count_parameters(option_b) == paper + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # 2,752
    projections = [b.projection for b in option_b.layers if b.projection is not None]
    assert len(projections) == 2 and [p[0].stride for p in projections] == [(2, 2), (2, 2)]
    x = torch.randn(2, 3, 32, 32)
    assert option_b.eval()(x).shape == (2, 100)
    wrn = models.build("wrn_40_2", 100, variant="crd")  # RepDistiller's wrn.py zeroes the Linear bias
    assert wrn.fc.bias.abs().sum() == 0 and models.count_parameters(wrn) == 2_255_156
    assert utils.recipe_for("crd", "cifar100", "student", "resnet20").variant == "crd"  # --recipe crd selects it


def test_script_init_statistics():
    model = models.build("mobilenetv2_1.4", 200, 64, variant="official")
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 2, 3)
            nn.init.uniform_(bn.bias, 2, 3)
    bn_bias = [bn.bias.clone() for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)]
    fc_bias = model.classifier[1].bias.clone()
    torch.manual_seed(0)
    assert models.script_init(model) is model
    fc = model.classifier[1]  # 1792 -> 200: std 1/1792
    assert fc.weight.std().item() == pytest.approx(1 / 1792, rel=0.01)
    assert abs(fc.weight.mean().item()) < 1e-5
    depthwise = max((c for c in _convs(model) if c.groups > 1), key=lambda c: c.weight.numel())
    assert depthwise.groups == depthwise.in_channels == 1344  # c = in_channels / groups x 3 x 3 = 9
    assert depthwise.weight.std().item() == pytest.approx(1 / 9, rel=0.03)
    pointwise = max((c for c in _convs(model) if c.groups == 1), key=lambda c: c.weight.numel())
    assert pointwise.weight.std().item() == pytest.approx(1 / pointwise.in_channels, rel=0.01)
    bns = [bn for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)]
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in bns)
    assert all(torch.equal(bn.bias, b) for bn, b in zip(bns, bn_bias))
    assert torch.equal(fc.bias, fc_bias)


def test_script_init_keeps_biases_and_uses_fan_in_of_large_layer():
    model = models.build("resnet34", 200, 64, variant="official")
    fc_bias = model.fc.bias.clone()
    torch.manual_seed(0)
    models.script_init(model)
    assert torch.equal(model.fc.bias, fc_bias)
    big = _convs(model)[-2]  # 512 x 3 x 3 = 4608 inputs per output channel
    assert big.weight.std().item() == pytest.approx(1 / 4608, rel=0.01)


def test_script_init_is_reproducible_from_the_seed():
    def redrawn(seed):
        """Conv/Linear weights and BN weights after the re-draw, seeded just before it."""
        model = models.build("mobilenet", 100, variant="official")
        torch.manual_seed(seed)
        models.script_init(model)
        return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]

    a, b, c = redrawn(1), redrawn(1), redrawn(2)
    assert len(a) == 2 + 2 * 2 * 13 + 1  # stem conv + BN, 13 blocks of two conv + BN, the Linear
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[-1], c[-1])


def test_cli_official():
    res = subprocess.run([sys.executable, "-m", "models", "--num-classes", "100", "--variant", "official"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert set(models.names()) <= set(lines)  # then the OKDDip release's networks
    assert "704,420" in lines["wrn_16_2"] and "17,179,940" in lines["wrn_16_10"]
    assert "no official architecture" in lines["resnet18"]

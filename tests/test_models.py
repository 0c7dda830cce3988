"""Tests for the model zoo: parameter counts vs. the SwitOKD paper, forward shapes, name handling."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import models

ROOT = Path(__file__).resolve().parents[1]

# (name, num_classes, image_size, parameters in millions reported by the paper)
PAPER_PARAMS = [
    # CIFAR-100
    ("wrn_16_2", 100, 32, 0.704),
    ("mobilenetv2_0.5", 100, 32, 0.813),
    ("wrn_16_10", 100, 32, 17.18),
    ("mobilenet", 100, 32, 3.31),
    ("wrn_40_2", 100, 32, 2.26),
    # CIFAR-10
    ("wrn_16_1", 10, 32, 0.176),
    ("wrn_16_8", 10, 32, 10.97),
    # Tiny-ImageNet
    ("resnet20", 200, 64, 0.28),
    ("wrn_16_2", 200, 64, 0.72),
    ("resnet34", 200, 64, 21.38),
    ("mobilenetv2_1.4", 200, 64, 4.67),
    # ImageNet
    ("resnet18", 1000, 224, 11.69),
    ("resnet34", 1000, 224, 21.80),
    ("mobilenetv2_0.5", 1000, 224, 1.97),
]
TINY_IMAGENET = sorted({name for name, classes, size, _ in PAPER_PARAMS if classes == 200})


@pytest.mark.parametrize("name,num_classes,image_size,expected", PAPER_PARAMS)
def test_parameter_count_matches_paper(name, num_classes, image_size, expected):
    n = models.count_parameters(models.build(name, num_classes, image_size)) / 1e6
    assert n == pytest.approx(expected, rel=0.02), f"{name}: {n:.3f}M vs paper {expected}M"


def _check_forward(model, x, num_classes):
    model.eval()
    with torch.no_grad():
        out = model(x)
        out_cl = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (x.shape[0], num_classes)
    assert torch.isfinite(out).all()
    # fresh BN running stats are identity, so deep nets have large logits: compare relative to their scale
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4 * out.abs().max().item())


@pytest.mark.parametrize("name", models.names())
def test_forward_cifar(name):
    torch.manual_seed(0)
    _check_forward(models.build(name, 100), torch.randn(2, 3, 32, 32), 100)


@pytest.mark.parametrize("name", TINY_IMAGENET)
def test_forward_tiny_imagenet(name):
    torch.manual_seed(0)
    _check_forward(models.build(name, 200, image_size=64), torch.randn(2, 3, 64, 64), 200)


def test_tiny_imagenet_mobilenetv2_is_the_released_torchvision_layout():
    torch.manual_seed(0)
    model = models.build("mobilenetv2_1.4", 200, image_size=64).eval()
    assert models.count_parameters(model) == 4_674_376
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 64, 64)).shape == (1, 1792, 2, 2)  # stage 2 strides
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.2
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    first = model.features[1].conv  # t = 1: depthwise conv-BN-ReLU6, then the linear 1x1 conv-BN
    assert len(first) == 3 and first[0][0].groups == 48
    assert model.classifier[1].weight.std().item() == pytest.approx(0.01, rel=0.01)


@pytest.mark.parametrize("image_size,params", [(32, 812_836), (63, 812_836), (64, 815_780)])
def test_mobilenetv2_layout_switches_at_64_px(image_size, params):
    assert models.count_parameters(models.build("mobilenetv2_0.5", 100, image_size)) == params


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_0.5"])
def test_forward_imagenet(name):
    torch.manual_seed(0)
    model = models.build(name, 1000, image_size=224)
    _check_forward(model, torch.randn(1, 3, 224, 224), 1000)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn_16_2", "mobilenet", "mobilenetv2_0.5"])
def test_autocast(name):
    model = models.build(name, 10).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()


def test_any_wrn_and_mobilenetv2_width_build():
    assert models.build("wrn_22_3", 10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert models.count_parameters(models.build("mobilenetv2", 10)) == models.count_parameters(
        models.build("mobilenetv2_1.0", 10))


@pytest.mark.parametrize("name,num_classes,bad", [
    ("wrn_17_2", 10, "wrn_17_2"),
    ("foo", 10, "foo"),
    ("resnet20", 1, "1"),
])
def test_bad_arguments_raise_one_line(name, num_classes, bad):
    with pytest.raises(ValueError) as err:
        models.build(name, num_classes)
    msg = str(err.value)
    assert bad in msg and "\n" not in msg


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=r"wrn_16_2.*mobilenetv2_<width>"):
        models.build("foo", 10)


def test_cli_lists_models():
    res = subprocess.run([sys.executable, "-m", "models", "--num-classes", "100"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for name in models.names():
        assert any(line.split()[0] == name for line in lines), name
    assert any(line.startswith("wrn_16_2 ") and "0.703" in line for line in lines)
    assert any(line.startswith("mobilenetv2_0.5 ") for line in lines)

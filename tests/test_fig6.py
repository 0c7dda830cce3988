"""scripts/plot_fig6.py: the last convolutional stage of every zoo network, Grad-CAM through captum
against its definition, the agreement scores and bad input. The figure end to end on smoke runs:
tests/test_scripts.py (scripts/fig6_gradcam.sh --smoke inside smoke_all.sh)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import models  # noqa: E402
import plot_fig6  # noqa: E402
import utils  # noqa: E402
from models.okddip_backbones import CIFAR_BACKBONES, IMAGENET_BACKBONES  # noqa: E402

ZOO = ([(name, 32, "paper") for name in models.names()]
       + [(name, 32, "official") for name in ("resnet20", "resnet34", "wrn_16_2")]  # other layouts; the rest: init
       + [(name, 32, "okddip") for name in CIFAR_BACKBONES]
       + [(name, 224, "okddip") for name in IMAGENET_BACKBONES]
       + [(name, 224, "paper") for name in ("resnet18", "resnet34", "mobilenetv2", "mobilenetv2_0.5")]
       + [("mobilenet", 64, "paper"), ("resnet20", 64, "paper")])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches: one thread is faster on a busy machine (as the launcher's smoke runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def classifier_input(model, layer, image_size):
    """(C, H, W) of ``layer``'s output and the in_features of the first Linear called after it."""
    seen = {}

    def stage(module, inputs, output):
        seen.setdefault("stage", tuple(output.shape[1:]))

    def linear(module, inputs, output):
        if "stage" in seen:
            seen.setdefault("fc", module.in_features)

    handles = [layer.register_forward_hook(stage)]
    handles += [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    return seen["stage"], seen["fc"]


@pytest.mark.parametrize("name, size, variant", ZOO, ids=[f"{n}-{s}px-{v}" for n, s, v in ZOO])
def test_last_conv_stage_of_every_zoo_network(name, size, variant):
    torch.manual_seed(0)
    model = models.build(name, 10, size, variant).eval()
    layer_name, layer = plot_fig6.last_conv_stage(model, size)
    (channels, height, width), fc_inputs = classifier_input(model, layer, size)
    assert channels == fc_inputs, layer_name  # the map that global pooling hands to the classifier
    assert height * width > 1 and height <= size // 4
    if name in ("resnet18", "resnet34") and size == 224:  # torchvision's
        assert layer_name == "layer4"
    maps = plot_fig6.grad_cam(model, layer, torch.randn(1, 3, size, size), torch.tensor([1]))
    assert maps.shape == (1, size, size) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-9


def test_grad_cam_is_the_definition():
    """ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of d y_c / d A_k, upsampled bilinearly, / max."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1),
                          nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    name, layer = plot_fig6.last_conv_stage(model, 16)
    assert name == "3"  # the BatchNorm: the last 4-D activation before the pooling
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    activations = model[:4](images).detach().requires_grad_()
    scores = model[4:](activations).gather(1, targets[:, None]).sum()
    alpha = torch.autograd.grad(scores, activations)[0].mean((2, 3), keepdim=True)
    expected = F.interpolate(F.relu((alpha * activations).sum(1, keepdim=True)), size=(16, 16),
                             mode="bilinear")[:, 0].detach().numpy()
    peak = expected.reshape(4, -1).max(1)
    expected = expected / np.where(peak > 0, peak, 1)[:, None, None]
    assert np.allclose(plot_fig6.grad_cam(model, layer, images, targets), expected, atol=1e-5)


def test_agreement_scores():
    y, x = np.mgrid[0:32, 0:32]
    blob = np.exp(-((x - 10) ** 2 + (y - 10) ** 2) / 20)
    moved = np.exp(-((x - 14) ** 2 + (y - 10) ** 2) / 20)
    far = np.exp(-((x - 28) ** 2 + (y - 28) ** 2) / 20)
    assert plot_fig6.correlation(blob, blob) == pytest.approx(1)
    assert plot_fig6.correlation(blob, far) < plot_fig6.correlation(blob, moved) < 1
    assert plot_fig6.iou(blob, blob) == 1 and plot_fig6.iou(blob, far) == 0
    assert 0 < plot_fig6.iou(blob, moved) < 1
    assert plot_fig6.correlation(blob, np.zeros_like(blob)) is None
    assert plot_fig6.iou(np.zeros_like(blob), np.zeros_like(blob)) is None
    assert plot_fig6.mean([None, 0.5, 1.0]) == 0.75 and plot_fig6.mean([None]) is None
    assert plot_fig6.pretty("resnet34") == "ResNet-34" and plot_fig6.pretty("mobilenetv2_0.5") == "0.5MobileNetV2"
    assert plot_fig6.pretty("wrn_16_2") == "WRN-16-2"


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(utils.UsageError, match="no run directory"):
        plot_fig6.main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(utils.UsageError, match="no best_teacher.pt or last.pt"):
        plot_fig6.main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit):
        plot_fig6.parse_args(["x", "--images", "0"])

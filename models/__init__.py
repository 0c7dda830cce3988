"""Model zoo for the SwitOKD reproduction.

``build(name, num_classes, image_size, variant)`` returns a plain ``nn.Module``
mapping (N, 3, H, W) images to (N, num_classes) logits.  Names:

* ``resnet20 resnet32 resnet44 resnet56 resnet110`` - CIFAR ResNets (resnet_cifar.py)
* ``resnet18 resnet34`` - torchvision ResNets; CIFAR-style stem below 160 px (resnet_imagenet.py)
* ``wrn_<depth>_<width>`` - Wide ResNets, depth = 6n+4 (wrn.py)
* ``mobilenet`` - CIFAR MobileNet v1 (mobilenet.py)
* ``mobilenetv2`` / ``mobilenetv2_<width>`` - MobileNetV2; torchvision's from 64 px (mobilenetv2.py)
* ``<method>:<backbone>[-shared][@m]`` - the OKDDip release's models (models/okddip.py), any variant:
  ``okddip: one: clilr: ind: okddip-net: baseline:`` on ``resnet32 resnet110 wrn_20_8 vgg16
  densenet40_12 resnet18 resnet34``; ``-shared`` = the release's shared DenseNet block 3; ``@m``
  branches (default 4).  E.g. ``okddip:resnet32``, ``one:vgg16@3``.  They return a ``BranchOutput``.

``variant`` is one of ``VARIANTS``: ``"paper"`` builds the standard published
architectures with He initialisation; ``"official"`` builds the architectures and
initialisations of the model files released with the paper (hfutqian/SwitOKD on
GitHub); ``"okddip"`` the single networks of the OKDDip release (DefangChen/OKDDip:
``resnet32 resnet110 wrn_20_8 vgg16 densenet40_12``, ImageNet ``resnet18 resnet34``;
models/okddip_backbones.py); ``"crd"`` the networks of the CRD benchmark (RepDistiller's
``models/``: CIFAR ResNets with 1x1-conv projection shortcuts, WRNs and the CIFAR MobileNetV2
with their Linear initialisation; the paper's for the networks it does not have).  Each
module's docstring says which released file it follows.
The multi-branch and multi-network models of OKDDip, ONE and CL-ILR are built by
``build_okddip`` (models/okddip.py) and listed by ``okddip_names``.
``script_init`` is the weight re-draw some released training scripts add on top.
``load(path)`` rebuilds a network saved by a training script, ``route_checkpoints(run_dir)``
lists the training route a run kept (models/checkpoints.py);
``FeatureExtractor`` gives any network's stage outputs, pre-pooling map and embedding
(models/features.py).
"""
import re

import torch
import torch.nn as nn

from .checkpoints import ROUTE_FILE, checkpoint_file, load, read_checkpoint, route_checkpoints
from .features import FeatureExtractor, find_features, match_stages
from .mobilenet import MobileNet
from .okddip import (BACKBONES as OKDDIP_BACKBONES, BranchOutput, build_okddip, build_okddip_backbone,
                     build_okddip_named, okddip_name, okddip_names)
from .mobilenetv2 import mobilenetv2
from .resnet_cifar import DEPTHS as CIFAR_RESNET_DEPTHS, resnet_cifar
from .resnet_imagenet import DEPTHS as IMAGENET_RESNET_DEPTHS, LARGE_IMAGE, resnet_imagenet
from .script_init import script_init
from .wrn import wrn, wrn_crd, wrn_official

__all__ = ["ROUTE_FILE", "VARIANTS", "BranchOutput", "FeatureExtractor", "NoOfficialArchitecture", "build",
           "check_name",
           "build_okddip", "checkpoint_file", "count_parameters", "find_features", "load", "match_stages", "names",
           "okddip_name", "okddip_names", "read_checkpoint", "route_checkpoints", "script_init"]

VARIANTS = ("paper", "official", "okddip", "crd")

_CANONICAL = (
    [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS]
    + [f"resnet{d}" for d in IMAGENET_RESNET_DEPTHS]
    + ["wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_16_8", "wrn_16_10", "wrn_40_2"]
    + ["mobilenet", "mobilenetv2", "mobilenetv2_0.5", "mobilenetv2_1.4"]
)
_PATTERNS = "wrn_<depth>_<width> (depth = 6n+4), mobilenetv2_<width>"


class NoOfficialArchitecture(ValueError):
    """``build(..., variant="official"|"okddip")`` for a network that no released file defines."""


def names() -> list[str]:
    """The canonical model names (``build`` also accepts any wrn_<d>_<k> / mobilenetv2_<w>)."""
    return list(_CANONICAL)


def check_name(name: str) -> None:
    """Raise ``ValueError`` (listing the names) when ``name`` is no network of the zoo; builds nothing
    (the network is made on the meta device), so a script can say so before it loads any data."""
    with torch.device("meta"):
        try:
            build(name, 10, 32)
        except NoOfficialArchitecture:
            pass


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, num_classes: int, image_size: int = 32, variant: str = "paper") -> nn.Module:
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if ":" in name:  # OKDDip-release models by name; the name fixes the architecture, whatever the variant
        return build_okddip_named(name, num_classes)
    if variant == "okddip":
        if name not in OKDDIP_BACKBONES:
            raise NoOfficialArchitecture(f"{name!r} has no OKDDip architecture; the OKDDip release has "
                                         f"{', '.join(OKDDIP_BACKBONES)}")
        return build_okddip_backbone(name, num_classes)
    official, crd = variant == "official", variant == "crd"
    if m := re.fullmatch(r"resnet(\d+)", name):
        depth = int(m[1])
        if depth in CIFAR_RESNET_DEPTHS:
            return resnet_cifar(depth, num_classes, official, projection=crd)
        if depth in IMAGENET_RESNET_DEPTHS:
            if official and depth == 18 and image_size < LARGE_IMAGE:
                raise NoOfficialArchitecture(
                    f"{name!r} has no official architecture below {LARGE_IMAGE} px (image_size {image_size}): "
                    "the release of hfutqian/SwitOKD has no small-input ResNet-18; use variant='paper'")
            return resnet_imagenet(depth, num_classes, image_size, official)
    if m := re.fullmatch(r"wrn_(\d+)_(\d+)", name):
        return (wrn_official if official else wrn_crd if crd else wrn)(int(m[1]), int(m[2]), num_classes)
    if name == "mobilenet":
        return MobileNet(num_classes)
    if m := re.fullmatch(r"mobilenetv2(?:_(\d+(?:\.\d+)?|\.\d+))?", name):
        width = float(m[1] or 1.0)
        if width <= 0:
            raise ValueError(f"invalid MobileNetV2 width in {name!r}; the width multiplier must be > 0")
        return mobilenetv2(width, num_classes, image_size, official or crd)  # RepDistiller's is the release's
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(_CANONICAL)}, {_PATTERNS}")

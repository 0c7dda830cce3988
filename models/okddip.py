"""Networks of the OKDDip paper's methods: OKDDip, ONE, CL-ILR, individual branches.

Chen, Mei, Wang, Feng, Chen, "Online Knowledge Distillation with Diverse Peers", AAAI 2020;
behaviour as read from the authors' code (``DefangChen/OKDDip``), stated with its files and lines
in docs/OKDDIP.md's last section ("R x" below).  The backbones and their split
points are in :mod:`models.okddip_backbones`.

Branch-based ("BB") models (R1.1, R1.5, R1.6): one shared trunk, m structurally identical
branches reading the same trunk output, plus the method's extra module:

* ``okddip`` - branches 0..m-2 are auxiliary peers, branch m-1 is the group leader.
  :class:`PeerAttention` (shared bias-free query/key maps d -> d/8) on the peers' pooled features.
* ``one`` - :class:`OneGate` on the trunk output, a per-sample softmax over the m branches.
* ``clilr`` - no extra module; ILR (backprop rescaling, :class:`ScaleGradient`) on by default.
* ``ind`` - m independent branches.  The release BUILDS the ONE gate for ``--ind`` but never
  uses it, so its parameter count equals ONE's; reproduced here: ``model.gate`` exists, is not
  run, and is frozen (``requires_grad_(False)``), so DistributedDataParallel needs no
  ``find_unused_parameters`` (DDP ignores frozen parameters; SGD skips them, as the release's
  SGD skips its gradient-less gate).  Every other model here uses all of its parameters, provided
  the loss uses the returned attention (OKDDip's query/key learn only through the peers' targets)
  and gate.

The forward pass returns a :class:`BranchOutput` and computes no distillation target and no
loss (those belong to the training scripts).  The release's layout of the logits is B x C x m;
here it is m x B x C (``logits[k]`` = branch k), features likewise m x B x d.

Two DenseNet slips of the release are not reproduced (parameter counts are unaffected): its
OKDDip DenseNet puts the leader into the attention (m x m instead of (m-1) x (m-1)) and skips
the leader's final BN-ReLU; here DenseNet follows the ResNet/VGG models.  Neither is its VGG-ONE
second pass through every branch (R1.6; each branch runs once here).

Network-based OKDDip (R1.7, ``--MulStu``): m independent baseline networks (the VGG
head then has the baseline's dropout 0.0, since ``train_GL.py`` passes ``--dropout``, default 0)
and the same attention on their pooled features; the last network is the leader.
"""
import re
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .okddip_backbones import (BACKBONES, CIFAR_BACKBONES, FEATURE_DIM, IMAGENET_BACKBONES, Split, SingleNet,
                               build_okddip_backbone, family, init_weights, single_net, split)

METHODS = ("okddip", "one", "clilr", "ind")
BB_DROPOUT = 0.5  # VGG head dropout of every multi-branch model (R1.3)

__all__ = ["BACKBONES", "CIFAR_BACKBONES", "IMAGENET_BACKBONES", "METHODS", "BranchOutput", "ScaleGradient",
           "PeerAttention", "OneGate", "BranchedNet", "NetworkOKDDip", "build_okddip_backbone", "build_branched",
           "build_network_based", "build_okddip", "build_okddip_named", "okddip_name", "okddip_names",
           "parse_okddip_name"]


class BranchOutput(NamedTuple):
    """What every multi-branch / multi-network model returns.

    logits:    (m, B, C), ``logits[k]`` = branch (network) k; for OKDDip k = m-1 is the leader.
    features:  (m, B, d), the pooled penultimate features the classifiers read.
    attention: OKDDip only, (B, m-1, m-1); row i = the weights peer i gives peers 0..m-2 (self
               included), rows sum to 1.  The peers' targets are ``sum_j attention[:, i, j] * logits[j]``.
    gate:      ONE only, (B, m) on the simplex; the ensemble logits are ``sum_k gate[:, k] * logits[k]``.
    """

    logits: Tensor
    features: Tensor
    attention: Optional[Tensor]
    gate: Optional[Tensor]


class ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; the backward pass divides the gradient by ``divisor``.

    CL-ILR's backprop rescaling (R1.6): put once on the trunk output, the tensor all
    branches (and the ONE gate) read, with ``divisor = m``, so the summed gradient of the branches
    enters the trunk divided by m while the branches' own gradients are unchanged.
    """

    @staticmethod
    def forward(ctx, x: Tensor, divisor: float) -> Tensor:
        ctx.divisor = divisor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad / ctx.divisor, None


class PeerAttention(nn.Module):
    """OKDDip's attention (R1.5): ``E_ij = (W_Q h_i) . (W_K h_j)``, softmax over j.

    ``W_Q``, ``W_K``: bias-free ``d -> d // factor`` maps shared by all peers; the dot product is
    not scaled, self (j = i) is included.  Input (n, B, d) features, output (B, n, n).
    """

    def __init__(self, dim: int, factor: int = 8):
        super().__init__()
        self.query = nn.Linear(dim, dim // factor, bias=False)
        self.key = nn.Linear(dim, dim // factor, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        q = self.query(features).transpose(0, 1)  # (B, n, d/8)
        k = self.key(features).transpose(0, 1)
        return torch.softmax(q @ k.transpose(1, 2), dim=-1)


class OneGate(nn.Sequential):
    """ONE's gate up to the softmax (R1.6): trunk output -> global average pool ->
    Linear (with bias) -> BatchNorm1d(m) -> ReLU, i.e. non-negative scores (B, m).

    The release pools with a fixed ``AvgPool2d(16)`` (ResNet) / ``AvgPool2d(8)`` (DenseNet), equal
    to the global pool used here for 32x32 inputs.
    """

    def __init__(self, channels: int, branches: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, branches),
                         nn.BatchNorm1d(branches), nn.ReLU())


class BranchedNet(nn.Module):
    """A branch-based model: ``trunk`` -> m ``branches`` (+ attention or gate by ``method``).

    ``ilr=True`` puts :class:`ScaleGradient` (divisor m) on the trunk output, before the branches
    and the gate (as the release's ``bpscale``).  ``deployed(k)`` = trunk + branch k as one
    network (shares the modules; the OKDDip leader is ``deployed(-1)``).
    """

    def __init__(self, parts: Split, method: str, ilr: bool = False):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.method, self.ilr = method, ilr
        self.trunk = parts.trunk
        self.branches = nn.ModuleList(parts.branches)
        self.attention = PeerAttention(parts.feature_dim) if method == "okddip" else None
        # "ind" builds the gate and never runs it: the release's parameter count (module docstring)
        self.gate = OneGate(parts.trunk_channels, len(self.branches)) if method in ("one", "ind") else None

    def forward(self, x: Tensor) -> BranchOutput:
        h = self.trunk(x)
        if self.ilr:
            h = ScaleGradient.apply(h, len(self.branches))
        features, logits = map(torch.stack, zip(*(branch(h) for branch in self.branches)))
        attention = self.attention(features[:-1]) if self.method == "okddip" else None
        gate = torch.softmax(self.gate(h), dim=1) if self.method == "one" else None
        return BranchOutput(logits, features, attention, gate)

    def deployed(self, k: int = -1) -> SingleNet:
        return SingleNet(self.trunk, self.branches[k])


class NetworkOKDDip(nn.Module):
    """Network-based OKDDip: m independent :class:`SingleNet` s, attention over nets 0..m-2,
    net m-1 the leader.  ``deployed(k)`` is net k."""

    def __init__(self, nets: list[SingleNet], feature_dim: int):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.attention = PeerAttention(feature_dim)

    def forward(self, x: Tensor) -> BranchOutput:
        features, logits = map(torch.stack, zip(*(net.features_and_logits(x) for net in self.nets)))
        return BranchOutput(logits, features, self.attention(features[:-1]), None)

    def deployed(self, k: int = -1) -> SingleNet:
        return self.nets[k]


def _check_branches(branches: int) -> None:
    if not isinstance(branches, int) or branches < 2:
        raise ValueError(f"branches must be an integer >= 2, got {branches!r}")


def build_branched(backbone: str, num_classes: int, method: str, branches: int = 4,
                   shared_dense_block: bool = False, ilr: Optional[bool] = None) -> BranchedNet:
    """The BB model of ``method`` on ``backbone`` with ``branches`` = m branches (4 in every script).

    ``ilr`` defaults to True for ``clilr`` (``--avg --bpscale``) and False otherwise; ``clilr``
    with ``ilr=False`` is CL without ILR, ``one`` with ``ilr=True`` the release's
    ``train_one.py --bpscale``.  ``shared_dense_block=True`` (DenseNet only) reproduces the
    release's bug of one block-3 object shared by all branches; the default gives each branch its
    own block 3, as intended (R1.4).  VGG heads use dropout 0.5.
    """
    _check_branches(branches)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    parts = split(backbone, num_classes, branches, dropout=BB_DROPOUT, shared_dense_block=shared_dense_block)
    model = BranchedNet(parts, method, method == "clilr" if ilr is None else ilr)
    if method == "ind":  # built, never run (module docstring): frozen, so DDP needs no find_unused_parameters
        model.gate.requires_grad_(False)
    # vgg_GL.py keeps PyTorch's default Linear biases, vgg_one.py zeroes them; densenet_GL.py zeroes
    # them like every DenseNet file (docs/OKDDIP.md, "Initialisation")
    kind = family(backbone)
    return init_weights(model, kind, zero_linear_bias=not (method == "okddip" and kind == "vgg"))


def build_network_based(backbone: str, num_classes: int, branches: int = 4) -> NetworkOKDDip:
    """Network-based OKDDip: ``branches`` baseline networks + attention (query/key default init)."""
    _check_branches(branches)
    nets = [single_net(backbone, num_classes) for _ in range(branches)]
    return NetworkOKDDip(nets, FEATURE_DIM[backbone])


def build_okddip(num_classes: int, method: str, backbone: str, branches: int = 4,
                 shared_dense_block: bool = False, ilr: Optional[bool] = None) -> nn.Module:
    """One entry point: ``method`` is ``baseline``, one of :data:`METHODS`, or ``okddip-net``."""
    if method in ("baseline", "okddip-net") and (shared_dense_block or ilr):
        raise ValueError(f"shared_dense_block and ilr apply to the branch-based models, not {method!r}")
    if method == "baseline":
        return build_okddip_backbone(backbone, num_classes)
    if method == "okddip-net":
        return build_network_based(backbone, num_classes, branches)
    return build_branched(backbone, num_classes, method, branches, shared_dense_block, ilr)


def okddip_names(imagenet: bool = True) -> list[tuple[str, dict]]:
    """``(display name, kwargs)`` of every network, ``build_okddip(num_classes, **kwargs)`` building it.

    Names are ``<method>:<backbone>``, e.g. ``baseline:resnet32``, ``okddip:resnet32``,
    ``one:resnet32``, ``clilr:resnet32``, ``ind:resnet32``, ``okddip-net:resnet32``; the
    release's shared-block DenseNet is ``<method>:densenet40_12-shared``.  m = 4 throughout.
    ``imagenet=False`` leaves out ResNet-18/34.
    """
    out = []
    for backbone in BACKBONES if imagenet else CIFAR_BACKBONES:
        out.append((f"baseline:{backbone}", dict(method="baseline", backbone=backbone)))
        out += [(f"{m}:{backbone}", dict(method=m, backbone=backbone)) for m in METHODS]
        if backbone == "densenet40_12":
            out += [(f"{m}:{backbone}-shared", dict(method=m, backbone=backbone, shared_dense_block=True))
                    for m in METHODS]
        out.append((f"okddip-net:{backbone}", dict(method="okddip-net", backbone=backbone)))
    return out


NAME = re.compile(r"(?P<method>baseline|okddip-net|okddip|one|clilr|ind):(?P<backbone>[a-z0-9_]+?)"
                  r"(?P<shared>-shared)?(?:@(?P<branches>\d+))?")
NAME_FORM = "<method>:<backbone>[-shared][@m], e.g. okddip:resnet32, one:vgg16@3, clilr:densenet40_12-shared"


def okddip_name(method: str, backbone: str, branches: int = 4, shared_dense_block: bool = False) -> str:
    """The registry name of a model of :func:`build_okddip`: ``<method>:<backbone>[-shared][@m]``.

    ``@m`` only when m differs from the release's 4; ``-shared`` = the release's shared DenseNet
    block 3.  ``models.build(name, num_classes)`` builds it (:func:`build_okddip_named`).
    """
    return f"{method}:{backbone}{'-shared' if shared_dense_block else ''}{'' if branches == 4 else f'@{branches}'}"


def parse_okddip_name(name: str) -> Optional[dict]:
    """``build_okddip``'s keyword arguments for a name of :func:`okddip_name`'s form; None for another name."""
    m = NAME.fullmatch(name)
    if m is None:
        return None
    kwargs = dict(method=m["method"], backbone=m["backbone"])
    if m["shared"]:
        kwargs["shared_dense_block"] = True
    if m["branches"] is not None:
        kwargs["branches"] = int(m["branches"])
    return kwargs


def build_okddip_named(name: str, num_classes: int) -> nn.Module:
    """``models.build`` for ``<method>:<backbone>[-shared][@m]`` names (m = 4 by default).

    ``baseline`` is the release's single network (no ``-shared``/``@m``); the ``ind`` model's
    unused ONE gate is frozen (module docstring).  A bad name or combination raises ValueError.
    """
    kwargs = parse_okddip_name(name)
    if kwargs is None:
        raise ValueError(f"bad OKDDip model name {name!r}; expected {NAME_FORM}")
    if kwargs["backbone"] not in BACKBONES:
        raise ValueError(f"unknown OKDDip backbone {kwargs['backbone']!r} in {name!r}; "
                         f"choose from {', '.join(BACKBONES)}")
    if kwargs["method"] == "baseline" and "branches" in kwargs:
        raise ValueError(f"{name!r}: a baseline has no branches; drop the @m")
    return build_okddip(num_classes, **kwargs)

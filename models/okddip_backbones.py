"""The single networks of the OKDDip release, cut into a shared trunk and a branch.

Chen, Mei, Wang, Feng, Chen, "Online Knowledge Distillation with Diverse Peers", AAAI 2020;
behaviour as read from the authors' code (``DefangChen/OKDDip``), stated with its files and lines
in docs/OKDDIP.md's last section (cited below as "R x").

Every network here is ``trunk -> branch``: the trunk holds the low layers that the branch-based
("BB") models share, the branch = the last stage(s) + pooling + classifier and maps the trunk
output to ``(feature, logits)``, ``feature`` being the pooled penultimate vector that the
classifier reads (and OKDDip's attention projects).  The baseline is one trunk + one branch, so
its parameters equal a deployed multi-branch model's (R1.1, R1.9).  CIFAR inputs are
32x32.

* ``resnet32`` - BasicBlock [5,5,5], widths 16/32/64 (R1.2).
* ``resnet110`` - the release's BOTTLENECK [12,12,12] network (expansion 4, outputs 64/128/256).
* ``wrn_20_8`` - the release's "wide_resnet20_8": Bottleneck [2,2,2] with inner width 8x
  (128/256/512), outputs 64/128/256; not Zagoruyko's WRN.
  All three: torchvision-style post-activation blocks, 3x3 stem without max-pool, a 1x1-conv+BN
  projection shortcut ("option B") whenever the shape changes; split after ``layer2``.
* ``vgg16`` - 13 convs with bias, each + BN + ReLU, and a Linear-ReLU-Dropout x2 + Linear head;
  split after the first 512 stage (R1.3).
* ``densenet40_12`` - DenseNet-BC, 3 blocks of 6 bottleneck layers, growth 12, 24 stem features,
  compression 0.5; split after transition 2; the branch is block 3 + BN + ReLU + pool + Linear
  (R1.4).
* ``resnet18`` / ``resnet34`` - torchvision's ImageNet ResNets; split after ``layer2``, the branch
  is ``layer3 + layer4 + fc`` (R1.8).

Initialisation (R1.1), applied by :func:`init_weights` to a whole assembled model:
ResNet convs Kaiming-normal fan_out, Linear layers PyTorch default; VGG convs Kaiming-normal
fan_out with zero bias, every Linear N(0, 0.01) with a zero bias (except in the OKDDip BB model,
whose Linear biases keep the default init); DenseNet convs Kaiming-normal fan_in, Linear biases
zero; BatchNorm gamma 1, beta 0 everywhere; ImageNet ResNets keep torchvision's init.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

CIFAR_BACKBONES = ("resnet32", "resnet110", "wrn_20_8", "vgg16", "densenet40_12")
IMAGENET_BACKBONES = ("resnet18", "resnet34")
BACKBONES = CIFAR_BACKBONES + IMAGENET_BACKBONES
# d, the pooled penultimate feature of a branch (OKDDip's query/key map d -> d/8)
FEATURE_DIM = {"resnet32": 64, "resnet110": 256, "wrn_20_8": 256, "vgg16": 512, "densenet40_12": 132,
               "resnet18": 512, "resnet34": 512}


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU (torchvision's block, R1.2)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, base_width: int = 64):
        super().__init__()
        if base_width != 64:  # the argument only gives both blocks one signature
            raise ValueError("BasicBlock has no width multiplier")
        self.body = nn.Sequential(*_conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(planes, planes, 3))
        self.shortcut = _projection(cin, planes, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1-3x3(stride)-1x1 with expansion 4 and inner width planes * base_width / 64."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, base_width: int = 64):
        super().__init__()
        width, cout = planes * base_width // 64, planes * self.expansion
        self.body = nn.Sequential(*_conv_bn(cin, width, 1), nn.ReLU(inplace=True),
                                  *_conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(width, cout, 1))
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    """Option B: 1x1 conv + BN when the shape changes, identity otherwise."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride))


def _resnet_stage(block, cin: int, planes: int, n: int, stride: int, base_width: int) -> nn.Sequential:
    blocks = [block(cin, planes, stride, base_width)]
    blocks += [block(planes * block.expansion, planes, 1, base_width) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); its k output maps are appended to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
                                  nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def _dense_block(cin: int, n: int, growth: int) -> nn.Sequential:
    return nn.Sequential(*(_DenseLayer(cin + i * growth, growth) for i in range(n)))


def _transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


def _vgg_stage(cin: int, cout: int, n: int) -> list[nn.Module]:
    layers = []
    for i in range(n):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers + [nn.MaxPool2d(2)]


class Branch(nn.Module):
    """``body`` (ends in the pooled, flattened feature) followed by ``classifier``.

    ``forward`` returns ``(feature, logits)``.
    """

    def __init__(self, body: nn.Module, classifier: nn.Module):
        super().__init__()
        self.body, self.classifier = body, classifier

    def forward(self, x):
        feature = self.body(x)
        return feature, self.classifier(feature)


class SingleNet(nn.Module):
    """``trunk`` + one ``branch``: a baseline network, or one branch of a BB model deployed alone.

    ``forward`` returns the logits; :meth:`features_and_logits` also the pooled feature.
    """

    def __init__(self, trunk: nn.Module, branch: Branch):
        super().__init__()
        self.trunk, self.branch = trunk, branch

    def features_and_logits(self, x):
        return self.branch(self.trunk(x))

    def forward(self, x):
        return self.features_and_logits(x)[1]


class Split(NamedTuple):
    """A backbone cut at the release's split point: one trunk and ``len(branches)`` branches."""

    trunk: nn.Module
    branches: list[Branch]
    trunk_channels: int  # channels of the trunk output (input of the ONE gate)
    feature_dim: int  # d, the pooled feature of a branch


def family(backbone: str) -> str:
    """Which init rule applies: ``resnet`` (CIFAR ResNets), ``vgg``, ``densenet`` or ``imagenet``."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown OKDDip backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    if backbone in IMAGENET_BACKBONES:
        return "imagenet"
    return {"vgg16": "vgg", "densenet40_12": "densenet"}.get(backbone, "resnet")


def split(backbone: str, num_classes: int, branches: int, *, dropout: float = 0.0,
          shared_dense_block: bool = False) -> Split:
    """Build the trunk and ``branches`` structurally identical branches of ``backbone``.

    ``dropout`` is VGG's head dropout; ``shared_dense_block`` makes every DenseNet branch hold
    the SAME block-3 object (the release's bug, R1.4).  Weights are not initialised
    here (see :func:`init_weights`), except for the ImageNet ResNets (torchvision's init).
    """
    kind = family(backbone)
    if shared_dense_block and backbone != "densenet40_12":
        raise ValueError("shared_dense_block applies to densenet40_12 only")
    if kind == "resnet":
        block, n, base = {"resnet32": (BasicBlock, 5, 64), "resnet110": (Bottleneck, 12, 64),
                          "wrn_20_8": (Bottleneck, 2, 64 * 8)}[backbone]
        e = block.expansion
        trunk = nn.Sequential(*_conv_bn(3, 16, 3), nn.ReLU(inplace=True),
                              _resnet_stage(block, 16, 16, n, 1, base),
                              _resnet_stage(block, 16 * e, 32, n, 2, base))
        heads = [Branch(nn.Sequential(_resnet_stage(block, 32 * e, 64, n, 2, base),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                        nn.Linear(64 * e, num_classes)) for _ in range(branches)]
        return Split(trunk, heads, 32 * e, FEATURE_DIM[backbone])
    if kind == "vgg":
        trunk = nn.Sequential(*_vgg_stage(3, 64, 2), *_vgg_stage(64, 128, 2), *_vgg_stage(128, 256, 3),
                              *_vgg_stage(256, 512, 3))
        heads = [Branch(nn.Sequential(*_vgg_stage(512, 512, 3), nn.Flatten()),
                        nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                      nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                      nn.Linear(512, num_classes)))
                 for _ in range(branches)]
        return Split(trunk, heads, 512, FEATURE_DIM[backbone])
    if kind == "densenet":
        growth, n = 12, 6
        trunk = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False),
                              _dense_block(24, n, growth), _transition(96, 48),
                              _dense_block(48, n, growth), _transition(120, 60))
        blocks = [_dense_block(60, n, growth) for _ in range(1 if shared_dense_block else branches)]
        blocks *= branches // len(blocks)  # shared: the release's one block-3 object in every branch
        heads = [Branch(nn.Sequential(block, nn.BatchNorm2d(132), nn.ReLU(inplace=True),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                        nn.Linear(132, num_classes)) for block in blocks]
        return Split(trunk, heads, 60, FEATURE_DIM[backbone])
    from torchvision.models import resnet18, resnet34  # lazy: torchvision import is slow

    nets = [{"resnet18": resnet18, "resnet34": resnet34}[backbone](weights=None, num_classes=num_classes)
            for _ in range(branches)]
    t = nets[0]
    trunk = nn.Sequential(t.conv1, t.bn1, t.relu, t.maxpool, t.layer1, t.layer2)
    heads = [Branch(nn.Sequential(net.layer3, net.layer4, net.avgpool, nn.Flatten()), net.fc) for net in nets]
    return Split(trunk, heads, 128, FEATURE_DIM[backbone])


def init_weights(model: nn.Module, kind: str, zero_linear_bias: bool = True) -> nn.Module:
    """Initialise ``model`` in place as the release does for backbone family ``kind`` (R1.1).

    Convs: Kaiming normal (ReLU gain), fan_out for ResNet/VGG, fan_in for DenseNet, biases zero.
    Linear: ResNet keeps PyTorch's default; VGG N(0, 0.01) weights; VGG and DenseNet zero biases
    unless ``zero_linear_bias=False`` (the OKDDip BB VGG).  BatchNorm keeps PyTorch's default
    gamma = 1, beta = 0, which is what the release sets.  ``imagenet``: torchvision's init, untouched.
    """
    if kind == "imagenet":
        return model
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            mode = "fan_in" if kind == "densenet" else "fan_out"
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and kind != "resnet":
            if kind == "vgg":
                nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None and zero_linear_bias:
                nn.init.zeros_(m.bias)
    return model


def single_net(name: str, num_classes: int) -> SingleNet:
    """Baseline ``name`` as a :class:`SingleNet` (trunk + branch), for every backbone, ImageNet included."""
    parts = split(name, num_classes, 1)
    return init_weights(SingleNet(parts.trunk, parts.branches[0]), family(name))


def build_okddip_backbone(name: str, num_classes: int) -> nn.Module:
    """The release's single-network baseline ``name`` (``train.py``; VGG head dropout 0.0).

    CIFAR names give a :class:`SingleNet`; ``resnet18`` / ``resnet34`` give torchvision's model.
    """
    if family(name) == "imagenet":
        from torchvision.models import resnet18, resnet34  # lazy: torchvision import is slow

        return {"resnet18": resnet18, "resnet34": resnet34}[name](weights=None, num_classes=num_classes)
    return single_net(name, num_classes)

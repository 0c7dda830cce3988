"""Wide ResNet WRN-d-k.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.  A 3x3 stem conv
with 16 channels, three stages of n = (d - 4) / 6 pre-activation basic blocks
(BN-ReLU-conv x2) with 16k/32k/64k channels, a final BN-ReLU, global average
pooling and a linear classifier.

``variant="paper"`` (``WideResNet``): the standard network as in the CRD /
RepDistiller code (the layout of ``wrn-40-2.py`` in hfutqian/SwitOKD): no conv
biases, stride on the first conv of a block, the 1x1 projection shortcut sees the
pre-activated input, optional dropout between the two convs.  Convolutions use
He (Kaiming normal, fan_out) initialisation.

``variant="official"`` (``wrn_official``): what the released SwitOKD scripts build.
Depth 16 follows ``wrnet.py`` (``ReleasedWideResNet``; the same file in every
CIFAR-10, CIFAR-100 and three-network script, there named ``wrnet16_1.py``,
``wrnet16_8.py``, ``wrnet.py``, ``wrnet2.py``).  Other depths follow the release's
``wrn-40-2.py``, which no released script trains.
"""
import math

import torch.nn as nn
import torch.nn.functional as F


def _blocks(depth: int, width: int) -> list[tuple[int, int]]:
    """(output channels, stride) of each block of WRN-depth-width, or ValueError."""
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(f"invalid WRN 'wrn_{depth}_{width}'; depth must be 6n+4 with n >= 1 "
                         "(10, 16, 22, 28, 40, ...) and width an integer >= 1")
    n = (depth - 4) // 6
    return [(16 * width * 2**i, 2 if (i > 0 and j == 0) else 1) for i in range(3) for j in range(n)]


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        same = stride == 1 and cin == cout
        self.shortcut = None if same else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        # the projection shortcut sees the pre-activated input, as in the reference code
        short = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.dropout(F.relu(self.bn2(o)), self.dropout, self.training)
        return self.conv2(o) + short


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
        for cout, stride in _blocks(depth, width):
            layers.append(PreActBlock(cin, cout, stride, dropout))
            cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.features(x))


class ReleasedBlock(nn.Module):
    """The pre-activation block of the released ``wrnet.py``.

    Differs from ``PreActBlock``: every conv has a bias, a down-sampling block
    strides in its SECOND 3x3 conv, and the 1x1 projection shortcut takes the raw
    block input.  The released block builds a Dropout(0.3) that its forward never
    applies; it has no parameters and is left out here.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1)
        same = stride == 1 and cin == cout
        self.shortcut = None if same else nn.Conv2d(cin, cout, 1, stride, 0)

    def forward(self, x):
        o = self.conv1(F.relu(self.bn1(x)))
        o = self.conv2(F.relu(self.bn2(o)))
        return o + (x if self.shortcut is None else self.shortcut(x))


class ReleasedWideResNet(nn.Module):
    """WRN-d-k as the released ``wrnet.py`` of hfutqian/SwitOKD builds it.

    A biased 3x3 stem conv, ``ReleasedBlock`` stages, a final BatchNorm built with
    momentum=0.9 (PyTorch convention: the running statistics take 90% of the
    latest batch), ReLU, average pooling and a linear classifier.  The release pools
    with a fixed 8x8 window, i.e. globally at 32 px; this pools globally at any size.
    Initialisation as the file's ``conv_init``: conv weights xavier_uniform with gain
    sqrt(2), conv biases zero; BatchNorm weight 1, bias 0; the Linear keeps PyTorch's
    default initialisation (``conv_init`` only matches class names containing "Conv").
    """

    def __init__(self, depth: int, width: int, num_classes: int):
        super().__init__()
        layers, cin = [nn.Conv2d(3, 16, 3, 1, 1)], 16
        for cout, stride in _blocks(depth, width):
            layers.append(ReleasedBlock(cin, cout, stride))
            cin = cout
        layers += [nn.BatchNorm2d(cin, momentum=0.9), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2))
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(self.features(x))


def wrn(depth: int, width: int, num_classes: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(depth, width, num_classes, dropout)


def wrn_crd(depth: int, width: int, num_classes: int) -> WideResNet:
    """RepDistiller's ``models/wrn.py`` (the CRD benchmark; the release's ``wrn-40-2.py`` is that
    file): ``WideResNet``'s architecture and conv initialisation (normal with std
    sqrt(2 / (k * k * out_channels)) = He fan_out) with the Linear bias zeroed."""
    model = WideResNet(depth, width, num_classes)
    nn.init.zeros_(model.fc.bias)
    return model


def wrn_official(depth: int, width: int, num_classes: int) -> nn.Module:
    """The released networks: ``wrnet.py`` for depth 16, ``wrn-40-2.py`` (:func:`wrn_crd`) otherwise."""
    if depth == 16:
        return ReleasedWideResNet(depth, width, num_classes)
    return wrn_crd(depth, width, num_classes)

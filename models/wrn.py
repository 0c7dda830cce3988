"""Wide ResNet WRN-d-k.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.  A 3x3 stem conv
with 16 channels, three stages of n = (d - 4) / 6 pre-activation basic blocks
(BN-ReLU-conv x2) with 16k/32k/64k channels, a final BN-ReLU, global average
pooling and a linear classifier.  A 1x1 conv shortcut is used when the shape
changes; optional dropout sits between the two convs of a block.  Convolutions
use He (Kaiming normal, fan_out) initialisation, as in the authors' code.
"""
import torch.nn as nn
import torch.nn.functional as F


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
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise ValueError(f"invalid WRN 'wrn_{depth}_{width}'; depth must be 6n+4 with n >= 1 "
                             "(10, 16, 22, 28, 40, ...) and width an integer >= 1")
        n = (depth - 4) // 6
        chans = [16 * width, 32 * width, 64 * width]
        layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
        for i, cout in enumerate(chans):
            for j in range(n):
                layers.append(PreActBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.features(x))


def wrn(depth: int, width: int, num_classes: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(depth, width, num_classes, dropout)

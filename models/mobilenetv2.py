"""MobileNetV2 with an arbitrary width multiplier.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018.

Small inputs (CIFAR / Tiny-ImageNet) use the layout of the CRD/RepDistiller
``MobileNetV2(T=6, W=w)`` (``mobile_half`` is w = 0.5), which is what the
distillation literature reports parameter counts for:

* stem: 3x3 stride-2 conv-BN-ReLU with int(32w) channels;
* the paper's (t, c, n, s) table with expansion t = 6 (1 for the first
  stage) and int(c * w) output channels, but every block *always* has the 1x1
  expansion conv (also when t = 1) and uses plain ReLU;
* last 1x1 conv with 1280 channels for w <= 1, int(1280 w) for w > 1;
* global average pooling and a linear classifier.

Convolutions use He (Kaiming normal, fan_out) initialisation, as in CRD.
Large inputs (image_size >= 160) use torchvision's ImageNet
``mobilenet_v2(width_mult=w)`` instead (see ``models.build``).
"""
import torch.nn as nn

# t, c, n, s  (t = None -> expansion 1)
SETTING = [(None, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hid = cin * t
        self.conv = nn.Sequential(*conv_bn(cin, hid, 1), *conv_bn(hid, hid, 3, stride, groups=hid),
                                  *conv_bn(hid, cout, 1, relu=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, width: float, num_classes: int):
        super().__init__()
        cin = int(32 * width)
        layers = conv_bn(3, cin, 3, stride=2)
        for t, c, n, s in SETTING:
            cout = int(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t or 1))
                cin = cout
        last = int(1280 * width) if width > 1.0 else 1280
        layers += conv_bn(cin, last, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.features(x))

"""MobileNetV2 with an arbitrary width multiplier.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018.  Two layouts, chosen by the input size (``mobilenetv2``):

* below 64 px (CIFAR), ``MobileNetV2``: the CRD/RepDistiller ``MobileNetV2(T=6, W=w)``
  (``mobile_half`` is w = 0.5), which the released ``mobilenetv2.py`` of
  hfutqian/SwitOKD (CIFAR-100 script) is, and which the distillation literature
  reports parameter counts for:

  - stem: 3x3 stride-2 conv-BN-ReLU with int(32w) channels;
  - the paper's (t, c, n, s) table with expansion t = 6 (1 for the first stage),
    except that stage 2 has stride 1, and int(c * w) output channels; every block
    *always* has the 1x1 expansion conv (also when t = 1) and uses plain ReLU;
  - last 1x1 conv with 1280 channels for w <= 1, int(1280 w) for w > 1;
  - global average pooling and a linear classifier.

  Convolutions use He (Kaiming normal, fan_out) initialisation, as in CRD;
  ``official=True`` also initialises the Linear as the released file does:
  weight N(0, 0.01), bias zero.

* from 64 px (Tiny-ImageNet, ImageNet), torchvision's ``mobilenet_v2(width_mult=w)``:
  the Tiny-ImageNet network of the released ``mobilenet_v2/mobilenet_v2.py`` (with
  ``inverted_residual.py`` and ``conv_bn_relu.py``) is that network, layout and
  initialisation alike: stage 2 has stride 2 (a 2x2 final feature map at 64 px),
  ReLU6, channels rounded to multiples of 8, no expansion conv when t = 1,
  Dropout(0.2) before the classifier; convs He fan_out, Linear N(0, 0.01), zero
  biases.  The paper names no other Tiny-ImageNet layout, so both variants use it.
"""
import torch.nn as nn

TORCHVISION_FROM = 64  # image_size from which torchvision's layout is built

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
    def __init__(self, width: float, num_classes: int, official: bool = False):
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
        if official:
            nn.init.normal_(self.fc.weight, 0.0, 0.01)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.features(x))


def mobilenetv2(width: float, num_classes: int, image_size: int, official: bool = False) -> nn.Module:
    if image_size >= TORCHVISION_FROM:
        from torchvision.models import mobilenet_v2  # lazy: torchvision import is slow

        return mobilenet_v2(weights=None, width_mult=width, num_classes=num_classes)
    return MobileNetV2(width, num_classes, official)

"""MobileNet v1, CIFAR variant.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications", arXiv:1704.04861, Table 1, adapted to 32-pixel inputs:
the stem is a 3x3 stride-1 conv (3->32), followed by 13 depthwise-separable
layers (3x3 depthwise conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU), global
average pooling and a linear classifier.  PyTorch default initialisation.

This is also ``variant="official"``: the released ``mobilenet.py`` of
hfutqian/SwitOKD (three-network scripts) has this architecture and no
initialisation code.  Those scripts then re-draw its weights with
``models.script_init``.
"""
import torch.nn as nn

# (output channels, stride) of each depthwise-separable layer
CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def conv_bn_relu(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class MobileNet(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        layers, cin = [conv_bn_relu(3, 32, 3, 1)], 32
        for cout, stride in CFG:
            layers += [conv_bn_relu(cin, cin, 3, stride, groups=cin), conv_bn_relu(cin, cout, 1, 1)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))

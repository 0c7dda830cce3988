"""CIFAR ResNet-20/32/44/56/110.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
Sec. 4.2: a 3x3 stem conv with 16 channels, then three stages of n basic blocks
with 16/32/64 channels (depth = 6n + 2), global average pooling and a linear
classifier.  Shortcuts are the parameter-free "option A": when the shape changes
the input is subsampled with stride 2 and zero-padded along the channel axis.

``variant="paper"``: convolutions use He (Kaiming normal, fan_out) initialisation.
``variant="crd"``: the ResNets of the CRD benchmark (RepDistiller's ``models/resnet.py``),
the same but for the shortcut of a block that changes the shape: a 1x1 convolution with
that stride and a BatchNorm (He et al.'s "option B"), 2,752 parameters more than option A
for every depth (e.g. ResNet-20 for 100 classes: 278,324 against 275,572).
``variant="official"``: the released ``resnet20.py`` of hfutqian/SwitOKD (CIFAR-10 and
Tiny-ImageNet scripts; it defines ResNet-20/32/44/56/110 and has this same
architecture) initialises Conv AND Linear weights He normal with fan_in
(``kaiming_normal_`` defaults); the Linear bias keeps PyTorch's default.
"""
import torch.nn as nn
import torch.nn.functional as F

DEPTHS = (20, 32, 44, 56, 110)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, projection: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin
        self.projection = None
        if projection and (stride > 1 or cin != cout):
            self.projection = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def shortcut(self, x):
        if self.projection is not None:  # option B
            return self.projection(x)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:  # zero channel padding, split evenly on both sides
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, official: bool = False, projection: bool = False):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, projection))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if official and isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet_cifar(depth: int, num_classes: int, official: bool = False, projection: bool = False) -> CifarResNet:
    """``projection``: option-B shortcuts (the ``crd`` variant); ``official``: the released init."""
    return CifarResNet(depth, num_classes, official, projection)

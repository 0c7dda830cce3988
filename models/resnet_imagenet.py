"""ResNet-18/34 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

For ImageNet-sized inputs (image_size >= 160) this is torchvision's
``resnet18``/``resnet34`` (no pretrained weights); the released ImageNet script of
hfutqian/SwitOKD builds these from a copy of torchvision's ``resnet.py``
(``ImageNet/ResNet18_34/models/resnet34.py``), initialisation included, so both
variants use them.  For 32/64-pixel inputs (CIFAR, Tiny-ImageNet) the same
torchvision BasicBlock network (64/128/256/512 channels, global average pooling)
gets a 3x3 stride-1 stem conv and no max-pool.

``variant="paper"``: torchvision's initialisation (He / Kaiming normal, fan_out,
for convolutions), also for the replaced stem conv.
``variant="official"`` below 160 px: the released Tiny-ImageNet ``resnet34.py``
(``Test/SwitOKD/models/resnet34.py``), which is this architecture with no
initialisation code of its own, i.e. PyTorch's default initialisation of every
Conv, Linear and BatchNorm.  The release has no small-input ResNet-18.
"""
import torch.nn as nn

DEPTHS = (18, 34)
LARGE_IMAGE = 160  # image_size from which torchvision's ImageNet stem is kept


def resnet_imagenet(depth: int, num_classes: int, image_size: int, official: bool = False) -> nn.Module:
    from torchvision.models import resnet18, resnet34  # lazy: torchvision import is slow

    model = {18: resnet18, 34: resnet34}[depth](weights=None, num_classes=num_classes)
    if image_size < LARGE_IMAGE:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        if official:
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    m.reset_parameters()
    return model

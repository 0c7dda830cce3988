"""ResNet-18/34 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

For ImageNet-sized inputs (image_size >= 160) this is torchvision's
``resnet18``/``resnet34`` (no pretrained weights).  For 32/64-pixel inputs
(CIFAR, Tiny-ImageNet) the same torchvision BasicBlock network (64/128/256/512
channels, global average pooling) gets a 3x3 stride-1 stem conv and no
max-pool.  Initialisation is torchvision's (He / Kaiming normal, fan_out, for
convolutions), also for the replaced stem conv.
"""
import torch.nn as nn

DEPTHS = (18, 34)


def resnet_imagenet(depth: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18, resnet34  # lazy: torchvision import is slow

    model = {18: resnet18, 34: resnet34}[depth](weights=None, num_classes=num_classes)
    if image_size < 160:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model

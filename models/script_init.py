"""The weight re-draw done by some released training scripts, not by model files.

The Tiny-ImageNet script of hfutqian/SwitOKD (``Tiny-ImageNet/Train/SwitOKD/main.py``)
applies it to both networks, the ResNet-34 teacher first, then the 1.4MobileNetV2
student.  The three-network scripts (1T2S and 2T1S, CIFAR-100) apply the same rule
to the MobileNet (v1) student only; their re-draw of the WRNs is commented out, as
are those of the CIFAR-10, CIFAR-100 and ImageNet two-network scripts.
"""
import torch.nn as nn


def script_init(module: nn.Module) -> nn.Module:
    """Re-draw ``module``'s weights in place as the released scripts do; returns it.

    Every Conv2d and Linear weight is drawn from a normal with mean 0 and STANDARD
    DEVIATION 1 / c, c = the number of elements of one output unit's weight slice:
    in_features, or in_channels / groups x kernel area (9 for a 3x3 depthwise
    conv).  Every BatchNorm2d weight is set to 1.  Biases (conv, Linear,
    BatchNorm) and running statistics are left as they are.  Draws from torch's
    global RNG in ``module.modules()`` order, so ``torch.manual_seed`` reproduces it.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 1.0 / m.weight[0].numel())
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    return module

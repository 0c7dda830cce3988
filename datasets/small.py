"""Small in-memory datasets that need no download: scikit-learn digits and a synthetic set.

digits
    scikit-learn's ``load_digits()``: 1,797 real 8x8 handwritten-digit scans with values
    0..16. Pixels are scaled to uint8 0..255, upscaled to 32x32 with torch bilinear
    interpolation (``align_corners=False``, rounded back to uint8) and replicated to 3
    channels. Fixed split: ``train_test_split(test_size=0.25, random_state=0,
    stratify=target)``, giving 1,347 train and 450 test images. Train augmentation is
    RandomCrop(32, padding=4) without flips (digits are not mirror-symmetric).

synthetic
    A deterministic, learnable 10-class (by default) colour-pattern set: each class is a
    fixed random low-frequency colour pattern (a 4x4x3 random grid upsampled
    bilinearly); each image is a randomly shifted window of its class pattern with a
    random contrast and Gaussian pixel noise. Generator seeds are fixed (patterns 0,
    train 1, test 2), so any two builds with the same options are identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from . import transforms
from .core import DataBundle, gather_crops

# Per-channel mean/std of the digits TRAIN split after the 32x32 upscaling, in [0, 1]
# units (population std over all 1,347 x 32 x 32 pixels; the 3 channels are copies).
DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3234, 0.3234, 0.3234)

SYNTHETIC_DEFAULTS = {"num_classes": 10, "train_size": 2000, "test_size": 500, "image_size": 32}


class ArrayDataset(Dataset):
    """``(uint8 N,C,H,W images, int64 N targets)`` served through a transform as ``(tensor, int)`` items."""

    def __init__(self, images: Tensor, targets: Tensor, transform) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


def array_bundle(name: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int,
                 mean, std, flip: bool, source: str | None = None) -> DataBundle:
    """A :class:`DataBundle` for in-memory uint8 arrays with the small-set crop(pad 4)/flip pipeline."""
    size = train[0].shape[-1]
    return DataBundle(
        name=name, num_classes=num_classes, image_size=size, mean=mean, std=std,
        train=ArrayDataset(*train, transforms.crop_flip(size, 4, flip, mean, std)),
        test=ArrayDataset(*test, transforms.plain(mean, std)),
        train_arrays=train, test_arrays=test, crop_padding=4, flip=flip, source=source,
    )


def _digit_images(images) -> Tensor:
    scans = torch.from_numpy(images * (255 / 16)).round().to(torch.uint8)
    big = F.interpolate(scans[:, None].float(), size=(32, 32), mode="bilinear", align_corners=False)
    return big.round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def build_digits() -> DataBundle:
    """scikit-learn digits as 32x32 RGB uint8 with the fixed stratified 75/25 split (see module docstring)."""
    # Imported here: scikit-learn takes seconds to import and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.images, data.target, test_size=0.25, random_state=0, stratify=data.target
    )
    train = (_digit_images(x_tr), torch.from_numpy(y_tr).long())
    test = (_digit_images(x_te), torch.from_numpy(y_te).long())
    return array_bundle("digits", train, test, 10, DIGITS_MEAN, DIGITS_STD, flip=False,
                        source="scikit-learn load_digits()")


def _synthetic_split(patterns: Tensor, n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(patterns)
    slack = patterns.shape[-1] - size
    top = torch.randint(0, slack + 1, (n,), generator=gen)
    left = torch.randint(0, slack + 1, (n,), generator=gen)
    x = gather_crops(patterns[labels], top, left, size, size)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.0, generator=gen)
    x = 0.5 + (x - 0.5) * contrast + 0.2 * torch.randn(x.shape, generator=gen)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def build_synthetic(options: dict | None = None) -> DataBundle:
    """The synthetic colour-pattern set; ``options`` overrides keys of ``SYNTHETIC_DEFAULTS``."""
    unknown = set(options or {}) - set(SYNTHETIC_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown synthetic option(s) {sorted(unknown)}; accepted: {sorted(SYNTHETIC_DEFAULTS)}")
    cfg = {**SYNTHETIC_DEFAULTS, **(options or {})}
    k, size = int(cfg["num_classes"]), int(cfg["image_size"])
    grid = torch.rand(k, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    patterns = F.interpolate(grid, size=(size + size // 4,) * 2, mode="bilinear", align_corners=False)
    train = _synthetic_split(patterns, int(cfg["train_size"]), size, seed=1)
    test = _synthetic_split(patterns, int(cfg["test_size"]), size, seed=2)
    pixels = train[0].double().div(255).transpose(0, 1).flatten(1)
    mean = tuple(round(v, 4) for v in pixels.mean(1).tolist())
    std = tuple(round(v, 4) for v in pixels.std(1, unbiased=False).tolist())
    return array_bundle("synthetic", train, test, k, mean, std, flip=True, source=f"generated {cfg}")

"""torchvision.transforms.v2 pipelines; every pipeline ends in a plain float32 CHW tensor."""

import torch
from torchvision.transforms import v2


def _finish(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


def crop_flip(size: int, padding: int, flip: bool, mean, std) -> v2.Compose:
    """Train pipeline of the small sets: RandomCrop(size, padding, zero fill) [+ RandomHorizontalFlip] + normalise."""
    steps = [v2.ToImage(), v2.RandomCrop(size, padding=padding)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _finish(mean, std))


def plain(mean, std) -> v2.Compose:
    """Eval pipeline of the small sets: convert and normalise only."""
    return v2.Compose([v2.ToImage(), *_finish(mean, std)])


def imagenet_train(mean, std) -> v2.Compose:
    """ImageNet train pipeline: RandomResizedCrop(224) + RandomHorizontalFlip + normalise."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), *_finish(mean, std)])


def imagenet_eval(mean, std) -> v2.Compose:
    """ImageNet eval pipeline: Resize(256) + CenterCrop(224) + normalise."""
    return v2.Compose([v2.ToImage(), v2.Resize(256), v2.CenterCrop(224), *_finish(mean, std)])

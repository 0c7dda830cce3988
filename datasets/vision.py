"""CIFAR-10/100, Tiny-ImageNet-200 and ImageNet through torchvision's own dataset classes.

Normalisation statistics follow the authors' released scripts: CIFAR-10 and CIFAR-100
use their own (rounded) channel statistics, Tiny-ImageNet reuses the common CIFAR-10
constants (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010), ImageNet the usual
ImageNet statistics.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import v2

from . import transforms
from .core import DataBundle, not_found

CIFAR_STATS = {
    "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}
TINY_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_LAYOUT = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, EOFError)


def _fetch_hint(download: bool, err: Exception) -> str:
    if download:
        return "downloading it failed: " + " ".join(f"{type(err).__name__}: {err}".split())
    return "pass --download to fetch it"


def _arrays(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def build_cifar(name: str, root: str, download: bool) -> DataBundle:
    """CIFAR-10 or CIFAR-100 (python pickle version) under ``root`` via torchvision."""
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    mean, std = CIFAR_STATS[name]
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    try:
        train = cls(root, train=True, download=download, transform=transforms.crop_flip(32, 4, True, mean, std))
        test = cls(root, train=False, transform=transforms.plain(mean, std))
    except _READ_ERRORS as err:
        layout = f"the python version of {name} ({', '.join(files)})"
        raise not_found(name, Path(root) / cls.base_folder, layout, _fetch_hint(download, err)) from err
    return DataBundle(
        name=name, num_classes=len(train.classes), image_size=32, mean=mean, std=std,
        train=train, test=test, train_arrays=_arrays(train), test_arrays=_arrays(test),
        crop_padding=4, flip=True,
    )


class TinyImageNet(ImageFolder):
    """One split of the official ``tiny-imagenet-200/`` tree.

    Class indices follow the sorted wnids of ``wnids.txt`` (the order ImageFolder
    gives ``train/``). ``train`` reads ``train/<wnid>/images/*.JPEG``; ``val`` reads
    ``val/images/*`` with labels from ``val/val_annotations.txt`` (tab-separated
    filename, wnid, bounding box).
    """

    def __init__(self, base: str | Path, split: str, transform=None) -> None:
        self.split = split
        self.base = Path(base)
        super().__init__(self.base / split, transform=transform)

    def find_classes(self, directory):
        wnids = sorted((self.base / "wnids.txt").read_text().split())
        return wnids, {wnid: i for i, wnid in enumerate(wnids)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        if self.split == "train":
            return super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        rows = [line.split("\t") for line in (Path(directory) / "val_annotations.txt").read_text().splitlines()]
        return [(os.path.join(directory, "images", row[0]), class_to_idx[row[1]]) for row in rows if row[0]]


def build_tinyimagenet(root: str, download: bool) -> DataBundle:
    """Tiny-ImageNet-200 (``root/tiny-imagenet-200``), evaluated on its official val split."""
    base = Path(root) / "tiny-imagenet-200"
    mean, std = TINY_STATS
    try:
        if download and not base.is_dir():
            download_and_extract_archive(TINY_URL, str(root), md5=TINY_MD5)
        train = TinyImageNet(base, "train", transforms.crop_flip(64, 4, True, mean, std))
        test = TinyImageNet(base, "val", transforms.plain(mean, std))
    except _READ_ERRORS as err:
        raise not_found("tinyimagenet", base, TINY_LAYOUT, _fetch_hint(download, err)) from err
    return DataBundle(
        name="tinyimagenet", num_classes=len(train.classes), image_size=64, mean=mean, std=std,
        train=train, test=test, train_arrays=None, test_arrays=None, crop_padding=4, flip=True,
    )


def build_imagenet(root: str) -> DataBundle:
    """ImageNet (ILSVRC-2012) as ``root/train/<class>/*`` and ``root/val/<class>/*``; never downloaded."""
    mean, std = IMAGENET_STATS
    try:
        train = ImageFolder(Path(root) / "train", transform=transforms.imagenet_train(mean, std))
        test = ImageFolder(Path(root) / "val", transform=transforms.imagenet_eval(mean, std))
    except _READ_ERRORS as err:
        hint = "it cannot be downloaded automatically (--download does not apply): obtain ILSVRC-2012 yourself"
        raise not_found("imagenet", root, "train/<class>/*.JPEG and val/<class>/*.JPEG", hint) from err
    return DataBundle(
        name="imagenet", num_classes=len(train.classes), image_size=224, mean=mean, std=std,
        train=train, test=test, train_arrays=None, test_arrays=None, crop_padding=0, flip=True,
    )


def image_folder(path, bundle: DataBundle) -> ImageFolder:
    """Images in ``path/<class>/`` served like ``bundle``'s test split: at its image size, with its statistics.

    Class folders named like the dataset's classes take those classes' indices; otherwise
    there must be one folder per class, taken in sorted order.
    """
    resize = [] if bundle.image_size >= 160 else [v2.Resize(bundle.image_size), v2.CenterCrop(bundle.image_size)]
    transform = transforms.imagenet_eval(bundle.mean, bundle.std) if not resize else v2.Compose(
        [v2.ToImage(), *resize, *transforms.plain(bundle.mean, bundle.std).transforms[1:]])
    try:
        folder = ImageFolder(path, transform=transform)
    except (OSError, FileNotFoundError) as err:
        raise not_found("image folder", path, "<class>/<image> sub-folders", str(err)) from err
    known = getattr(_root_dataset(bundle.test), "classes", None)
    if known and set(folder.classes) <= set(known):
        index = {name: known.index(name) for name in folder.classes}
        folder.samples = [(p, index[folder.classes[c]]) for p, c in folder.samples]
        folder.targets = [c for _, c in folder.samples]
    elif len(folder.classes) != bundle.num_classes:
        raise ValueError(f"{path} has {len(folder.classes)} class folders; {bundle.name} has {bundle.num_classes} "
                         "classes (name the folders after its classes, or give one per class)")
    return folder


def _root_dataset(dataset):
    return _root_dataset(dataset.dataset) if hasattr(dataset, "dataset") else dataset

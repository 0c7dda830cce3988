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
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import check_integrity, download_and_extract_archive
from torchvision.transforms import v2

from . import transforms
from .core import DataBundle, DatasetNotFoundError, not_found

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


def _describe(err: BaseException) -> str:
    """``"Type: message"`` of an exception on one line."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def _fetch_hint(download: bool, err: Exception) -> str:
    if download:
        return "downloading it failed: " + _describe(err)
    return "pass --download to fetch it"


def read_image(path) -> Image.Image:
    """ImageFolder loader: the RGB image at ``path``, or a one-line :class:`DatasetNotFoundError` naming the file.

    Replaces torchvision's PIL loader so that an image which exists but cannot be decoded
    (truncated, not an image, ...) is reported as ``cannot read image <path>: <cause>``.
    """
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetNotFoundError(f"cannot read image {path}: {_describe(err)}") from err


def _arrays(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _cifar_problem(cls, folder: Path, err: Exception) -> str:
    """Why an existing CIFAR folder cannot be read: its first missing, corrupt or unpicklable file."""
    files = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    for filename, md5 in files:
        if not (folder / filename).is_file():
            return f"{filename} is missing (the folder is incomplete)"
        if not check_integrity(str(folder / filename), md5):
            return f"{filename} is corrupt or incomplete (md5 mismatch)"
    for filename, _ in files:
        try:
            with open(folder / filename, "rb") as f:
                pickle.load(f, encoding="latin1")
        except Exception as bad:  # noqa: BLE001 - any failure to unpickle means the file is unreadable
            return f"{filename} is corrupt or incomplete (unreadable: {_describe(bad)})"
    return f"its files pass their md5 check but reading them failed ({_describe(err)})"


def build_cifar(name: str, root: str, download: bool) -> DataBundle:
    """CIFAR-10 or CIFAR-100 (python pickle version) under ``root`` via torchvision.

    Only a missing folder is downloaded (when ``download``): an existing one is read as it
    is, so a corrupt file is reported as such instead of triggering a fresh download.
    """
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    mean, std = CIFAR_STATS[name]
    folder = Path(root) / cls.base_folder
    fetch = download and not folder.is_dir()
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    try:
        train = cls(root, train=True, download=fetch, transform=transforms.crop_flip(32, 4, True, mean, std))
        test = cls(root, train=False, transform=transforms.plain(mean, std))
    except _READ_ERRORS as err:
        layout = f"the python version of {name} ({', '.join(files)})"
        if fetch or not folder.is_dir():
            hint = _fetch_hint(fetch, err)
        else:
            hint = f"{_cifar_problem(cls, folder, err)}; delete {folder} to download it again"
        raise not_found(name, folder, layout, hint) from err
    return DataBundle(
        name=name, num_classes=len(train.classes), image_size=32, mean=mean, std=std,
        train=train, test=test, train_arrays=_arrays(train), test_arrays=_arrays(test),
        crop_padding=4, flip=True, source=str(folder),
    )


class TinyImageNet(ImageFolder):
    """One split of the official ``tiny-imagenet-200/`` tree.

    Class indices follow the sorted wnids of ``wnids.txt`` (the order ImageFolder
    gives ``train/``). ``train`` reads ``train/<wnid>/images/*.JPEG``; ``val`` reads
    ``val/images/*`` with labels from ``val/val_annotations.txt`` (tab-separated
    filename, wnid, bounding box). Images are read by :func:`read_image`. Build it after
    :func:`check_tiny_layout` has accepted the tree.
    """

    def __init__(self, base: str | Path, split: str, transform=None) -> None:
        self.split = split
        self.base = Path(base)
        super().__init__(self.base / split, transform=transform, loader=read_image)

    def find_classes(self, directory):
        wnids = sorted((self.base / "wnids.txt").read_text().split())
        return wnids, {wnid: i for i, wnid in enumerate(wnids)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        if self.split == "train":
            return super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        rows = [line.split("\t") for line in (Path(directory) / "val_annotations.txt").read_text().splitlines()]
        return [(os.path.join(directory, "images", row[0].strip()), class_to_idx[row[1].strip()])
                for row in rows if row[0].strip()]


class _TinyLayoutError(Exception):
    """One problem of a Tiny-ImageNet tree (internal to :func:`check_tiny_layout`)."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _read_text(base: Path, relative: str) -> str:
    path = base / relative
    if not path.is_file():
        raise _TinyLayoutError(f"{relative} is missing")
    try:
        return path.read_text()
    except (OSError, ValueError) as err:
        raise _TinyLayoutError(f"{relative} is unreadable: {_describe(err)}") from err


def _image_files(folder: Path) -> dict[str, int]:
    """Name -> size of the image files (by extension, as ImageFolder decides) directly in ``folder``."""
    with os.scandir(folder) as entries:
        return {e.name: e.stat().st_size for e in entries if e.is_file() and _is_image(e.name)}


def _check_tiny(base: Path) -> None:
    wnids = _read_text(base, "wnids.txt").split()
    if not wnids:
        raise _TinyLayoutError("wnids.txt is empty")
    seen = set()
    for wnid in wnids:
        if wnid in seen:
            raise _TinyLayoutError(f"wnids.txt lists wnid {wnid} twice")
        seen.add(wnid)
    for wnid in wnids:
        folder = f"train/{wnid}/images/"
        if not (base / folder).is_dir():
            raise _TinyLayoutError(f"{folder} is missing (wnid {wnid} of wnids.txt has no training images)")
        images = _image_files(base / folder)
        if not images:
            raise _TinyLayoutError(f"{folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
        empty = sorted(name for name, size in images.items() if size == 0)
        if empty:
            raise _TinyLayoutError(f"{folder}{empty[0]} is empty ({len(empty)} empty image(s) in {folder})")
    annotations = "val/val_annotations.txt"
    if not (base / "val/images").is_dir():
        raise _TinyLayoutError("val/images/ is missing")
    val_images = _image_files(base / "val/images")
    listed: dict[str, int] = {}
    missing = []
    for number, line in enumerate(_read_text(base, annotations).splitlines(), start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("\t")]
        where = f"{annotations} line {number}"
        if len(fields) < 2:
            raise _TinyLayoutError(f"{where} has {len(fields)} tab-separated field, "
                                   "expected at least 2 (file name, wnid)")
        filename, wnid = fields[:2]
        if not filename:
            raise _TinyLayoutError(f"{where} has an empty file name")
        if wnid not in seen:
            raise _TinyLayoutError(f"{where} names wnid {wnid} not in wnids.txt")
        if filename in listed:
            raise _TinyLayoutError(f"{where} repeats {filename} (first on line {listed[filename]})")
        listed[filename] = number
        path = base / "val/images" / filename
        if not path.is_file():
            missing.append((number, filename))
        elif path.stat().st_size == 0:
            raise _TinyLayoutError(f"val/images/{filename} (named on {where}) is empty")
    if not listed:
        raise _TinyLayoutError(f"{annotations} lists no images")
    if missing:
        number, filename = missing[0]
        raise _TinyLayoutError(f"{annotations} line {number} names {filename}, which is missing from val/images/ "
                               f"({len(missing)} of its {len(listed)} images missing)")
    extra = sorted(set(val_images) - set(listed))
    if extra:
        raise _TinyLayoutError(f"val/images/ holds {len(val_images)} images but {annotations} lists {len(listed)}: "
                               f"{len(extra)} extra image(s) not annotated, e.g. val/images/{extra[0]}")


def check_tiny_layout(base: str | Path) -> None:
    """Check an existing ``tiny-imagenet-200/`` tree cheaply (listing and ``stat`` only, no decoding).

    Checks that ``wnids.txt`` lists distinct wnids; that every wnid has a
    ``train/<wnid>/images/`` folder with at least one non-empty image; that every
    non-blank line of ``val/val_annotations.txt`` has at least 2 tab-separated fields,
    names a wnid of ``wnids.txt`` and a distinct, non-empty file of ``val/images/``; and
    that ``val/images/`` holds no image the annotations do not list. The first problem
    raises :class:`DatasetNotFoundError` with one line naming the file (and line) at fault.
    """
    base = Path(base)
    try:
        _check_tiny(base)
    except _TinyLayoutError as problem:
        raise not_found("tinyimagenet", base, TINY_LAYOUT, " ".join(str(problem).split())) from problem.__cause__
    except OSError as err:
        raise not_found("tinyimagenet", base, TINY_LAYOUT, f"listing it failed: {_describe(err)}") from err


def build_tinyimagenet(root: str, download: bool) -> DataBundle:
    """Tiny-ImageNet-200 (``root/tiny-imagenet-200``), evaluated on its official val split.

    A missing tree is downloaded when ``download``; the tree is then checked by
    :func:`check_tiny_layout` before the splits are built.
    """
    base = Path(root) / "tiny-imagenet-200"
    mean, std = TINY_STATS
    fetch = download and not base.is_dir()
    try:
        if fetch:
            download_and_extract_archive(TINY_URL, str(root), md5=TINY_MD5)
    except _READ_ERRORS as err:
        raise not_found("tinyimagenet", base, TINY_LAYOUT, _fetch_hint(True, err)) from err
    if not base.is_dir():
        hint = "the downloaded archive did not create it" if fetch else _fetch_hint(False, None)
        raise not_found("tinyimagenet", base, TINY_LAYOUT, hint)
    check_tiny_layout(base)
    try:
        train = TinyImageNet(base, "train", transforms.crop_flip(64, 4, True, mean, std))
        test = TinyImageNet(base, "val", transforms.plain(mean, std))
    except _READ_ERRORS as err:
        raise not_found("tinyimagenet", base, TINY_LAYOUT, "reading it failed: " + _describe(err)) from err
    return DataBundle(
        name="tinyimagenet", num_classes=len(train.classes), image_size=64, mean=mean, std=std,
        train=train, test=test, train_arrays=None, test_arrays=None, crop_padding=4, flip=True,
        source=str(base),
    )


IMAGENET_LAYOUT = "imagenet/train/<class>/*.JPEG and imagenet/val/<class>/*.JPEG (the val images in class folders)"


def build_imagenet(root: str) -> DataBundle:
    """ImageNet (ILSVRC-2012) as ``root/imagenet/train/<class>/*`` and ``root/imagenet/val/<class>/*``;
    never downloaded."""
    mean, std = IMAGENET_STATS
    base = Path(root) / "imagenet"
    try:
        train = ImageFolder(base / "train", transform=transforms.imagenet_train(mean, std), loader=read_image)
        test = ImageFolder(base / "val", transform=transforms.imagenet_eval(mean, std), loader=read_image)
    except _READ_ERRORS as err:
        hint = ("it cannot be downloaded automatically (--download does not apply): obtain ILSVRC-2012 yourself "
                f"({' '.join(_describe(err).split()[:12])})")
        raise not_found("imagenet", root, IMAGENET_LAYOUT, hint) from err
    return DataBundle(
        name="imagenet", num_classes=len(train.classes), image_size=224, mean=mean, std=std,
        train=train, test=test, train_arrays=None, test_arrays=None, crop_padding=0, flip=True,
        source=str(base),
    )


def image_folder(path, bundle: DataBundle) -> ImageFolder:
    """Images in ``path/<class>/`` served like ``bundle``'s test split: at its image size, with its statistics.

    Class folders named like the dataset's classes, or by class index (``0``, ``3``, ...), take
    those classes' indices (any subset of the classes); otherwise there must be one folder per
    class, taken in sorted order.
    """
    resize = [] if bundle.image_size >= 160 else [v2.Resize(bundle.image_size), v2.CenterCrop(bundle.image_size)]
    transform = transforms.imagenet_eval(bundle.mean, bundle.std) if not resize else v2.Compose(
        [v2.ToImage(), *resize, *transforms.plain(bundle.mean, bundle.std).transforms[1:]])
    try:
        folder = ImageFolder(path, transform=transform, loader=read_image)
    except (OSError, FileNotFoundError) as err:
        raise not_found("image folder", path, "<class>/<image> sub-folders", str(err)) from err
    known = getattr(_root_dataset(bundle.test), "classes", None)
    index = None
    if known and set(folder.classes) <= set(known):
        index = {name: known.index(name) for name in folder.classes}
    elif all(name.isdigit() and int(name) < bundle.num_classes for name in folder.classes):
        index = {name: int(name) for name in folder.classes}
    if index is not None:
        folder.samples = [(p, index[folder.classes[c]]) for p, c in folder.samples]
        folder.targets = [c for _, c in folder.samples]
    elif len(folder.classes) != bundle.num_classes:
        raise ValueError(f"{path} has {len(folder.classes)} class folders; {bundle.name} has {bundle.num_classes} "
                         "classes (name the folders after its classes or their indices, or give one per class)")
    return folder


def _root_dataset(dataset):
    return _root_dataset(dataset.dataset) if hasattr(dataset, "dataset") else dataset

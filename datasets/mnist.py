"""MNIST and Fashion-MNIST (LeCun et al., 1998; Xiao et al., 2017) through torchvision's dataset classes.

Where the four original idx files are looked for, in order:

1. ``<root>/MNIST/raw/`` or ``<root>/FashionMNIST/raw/`` (torchvision's layout): each file
   extracted (``train-images-idx3-ubyte``) or gzipped (``train-images-idx3-ubyte.gz``);
2. for Fashion-MNIST, the Debian package ``dataset-fashion-mnist`` (:data:`DEBIAN_FOLDERS`);
3. with ``download``, torchvision's download into the folder of 1.

Gzipped files are decompressed into a temporary folder that torchvision's class then
reads (nothing is written under ``root``): the Debian package's files are re-compressed,
so their checksums differ from torchvision's list and its own download step would reject
them and fetch the set again.

Input: the 28x28 greyscale images are zero-padded by 2 pixels to 32x32 (the images'
background is 0) and replicated to 3 channels, so that every network of the zoo (built
for 32x32 RGB) runs unchanged. Training augmentation: RandomCrop(32, padding=4), with
a horizontal flip for Fashion-MNIST (garments are mirror-symmetric) and without for
MNIST (digits are not). Normalisation: per-channel mean and population standard
deviation of the training split as the networks see it (padded, in [0, 1]), computed
when the set is built and rounded to 4 decimals (Fashion-MNIST: 0.2190 / 0.3318).
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from .core import DataBundle, DatasetNotFoundError, not_found
from .small import array_bundle

CLASSES = {"mnist": MNIST, "fashionmnist": FashionMNIST}
DEBIAN_FOLDERS = {"fashionmnist": Path("/usr/share/datasets/fashion-mnist")}
"""Where a Debian package puts the original files (``apt-get install dataset-fashion-mnist``)."""
DEBIAN_PACKAGES = {"fashionmnist": "dataset-fashion-mnist"}
FLIP = {"mnist": False, "fashionmnist": True}
PAD = 2  # 28 + 2 + 2 = 32
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, TypeError, AssertionError, KeyError)


def idx_names(cls) -> list[str]:
    """The four extracted file names torchvision reads (train images, train labels, test images, test labels)."""
    return [name.removesuffix(".gz") for name, _ in cls.resources]


def find_files(cls, folder: Path) -> dict[str, Path] | None:
    """Each idx file of ``cls`` in ``folder``, extracted if present, else gzipped; None unless all four are there."""
    found = {}
    for name in idx_names(cls):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


def _stage(cls, files: dict[str, Path], staging: Path) -> Path:
    """A torchvision root under ``staging`` holding ``files`` extracted (gzipped ones decompressed, others linked)."""
    raw = staging / cls.__name__ / "raw"
    raw.mkdir(parents=True)
    for name, path in files.items():
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as source, open(raw / name, "wb") as target:
                shutil.copyfileobj(source, target)
        else:
            (raw / name).symlink_to(path.resolve())
    return staging


def _problem(cls, files: dict[str, Path], err: Exception) -> str:
    """Why the files cannot be read: the first one that is not a valid idx file, or the split sizes."""
    for name, path in files.items():
        reader = read_image_file if "images" in name else read_label_file
        try:
            with tempfile.TemporaryDirectory() as tmp:
                reader(str(_stage(cls, {name: path}, Path(tmp)) / cls.__name__ / "raw" / name))
        except Exception as bad:  # noqa: BLE001 - any failure to decode means the file is unreadable
            return f"{path.name} is not a readable idx file ({type(bad).__name__}: {bad})"
    return f"reading them failed ({type(err).__name__}: {err})"


def _read(cls, files: dict[str, Path]) -> tuple[MNIST, MNIST]:
    with tempfile.TemporaryDirectory(prefix="switokd-idx-") as tmp:
        root = _stage(cls, files, Path(tmp))
        return cls(root, train=True), cls(root, train=False)


def _arrays(split: MNIST, name: str, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N,3,32,32 images, int64 N labels) of one split, checked for the shapes the format promises."""
    images, labels = split.data, split.targets
    which = "train" if split.train else "test"
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise not_found(name, folder, "28x28 idx images with one label each",
                        f"its {which} split has images of shape {tuple(images.shape)} and {len(labels)} labels")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(split.classes):
        raise not_found(name, folder, f"labels 0..{len(split.classes) - 1}",
                        f"its {which} labels range over {int(labels.min())}..{int(labels.max())}")
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    return padded[:, None].expand(-1, 3, -1, -1).contiguous(), labels.to(torch.int64)


def training_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 N,C,H,W images in [0, 1] units, rounded to 4 decimals.

    Exact, from each channel's histogram of the 256 pixel values (no float copy of the set).
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in images.unbind(1):
        counts = torch.bincount(channel.flatten(), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        means.append(round(float(mean), 4))
        stds.append(round(float(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()), 4))
    return tuple(means), tuple(stds)


def missing_hint(name: str, root: Path) -> str:
    cls = CLASSES[name]
    raw = root / cls.__name__ / "raw"
    ways = [f"pass --download to fetch it from the internet, or put {', '.join(idx_names(cls))} (each may be .gz) "
            f"in {raw}/"]
    if name in DEBIAN_PACKAGES:
        ways.append(f"or install the Debian package ({'apt-get install ' + DEBIAN_PACKAGES[name]}), "
                    f"which puts them in {DEBIAN_FOLDERS[name]}/")
    return ", ".join(ways)


def build_mnist(name: str, root: str, download: bool) -> DataBundle:
    """MNIST or Fashion-MNIST as 32x32 3-channel uint8 arrays (see the module docstring)."""
    cls, root = CLASSES[name], Path(root)
    raw = root / cls.__name__ / "raw"
    layout = "the four original idx files (extracted or .gz)"
    folders = [raw, *([DEBIAN_FOLDERS[name]] if name in DEBIAN_FOLDERS else [])]
    found = next(((folder, files) for folder in folders if (files := find_files(cls, folder))), None)
    if found is None and download:
        try:
            cls(root, train=True, download=True)
        except _READ_ERRORS as err:
            reason = " ".join(str(err).split())
            raise not_found(name, raw, layout, f"downloading it failed ({type(err).__name__}: {reason})") from err
        found = raw, find_files(cls, raw)
    if found is None:
        looked = " and ".join(f"{folder}/" for folder in folders)
        raise DatasetNotFoundError(f"{name} dataset not found: looked for {layout} in {looked}; "
                                   + missing_hint(name, root))
    folder, files = found
    try:
        train, test = _read(cls, files)
    except _READ_ERRORS as err:
        raise not_found(name, folder, layout, _problem(cls, files, err)) from err
    train_arrays, test_arrays = _arrays(train, name, folder), _arrays(test, name, folder)
    mean, std = training_statistics(train_arrays[0])
    return array_bundle(name, train_arrays, test_arrays, len(train.classes), mean, std, flip=FLIP[name],
                        source=str(folder))

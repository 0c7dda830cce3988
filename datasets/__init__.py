"""Data layer: dataset registry (:func:`build`) and epoch-seeded loaders (:func:`make_loaders`).

Datasets (``NAMES``): ``cifar10``/``cifar100`` (torchvision, downloadable),
``tinyimagenet`` (official ``tiny-imagenet-200/`` tree, downloadable, disk-backed),
``imagenet`` (ImageFolder ``train/``+``val/``, never downloaded, disk-backed),
``mnist``/``fashionmnist`` (original idx files, torchvision's classes; Fashion-MNIST also
from the Debian package ``dataset-fashion-mnist``), ``digits`` (scikit-learn, bundled) and
``synthetic`` (generated). See :mod:`datasets.vision`, :mod:`datasets.mnist` and
:mod:`datasets.small` for layouts, splits and statistics;
:class:`ContrastSampler` (:mod:`datasets.contrast`) draws CRD's positives and negatives.
"""

from __future__ import annotations

from .contrast import CONTRAST_MODES, ContrastSampler, train_targets
from .core import DataBundle, DatasetNotFoundError, split_holdout, take_subset
from .loaders import Loaders, make_loaders
from .mnist import build_mnist
from .small import SYNTHETIC_DEFAULTS, build_digits, build_synthetic
from .vision import build_cifar, build_imagenet, build_tinyimagenet, image_folder

NAMES = ("cifar10", "cifar100", "tinyimagenet", "imagenet", "mnist", "fashionmnist", "digits", "synthetic")

__all__ = ["CONTRAST_MODES", "NAMES", "SYNTHETIC_DEFAULTS", "ContrastSampler", "DataBundle", "DatasetNotFoundError",
           "Loaders", "build",
           "image_folder", "make_loaders", "train_targets"]


def _build_full(name: str, root: str, download: bool, synthetic: dict | None) -> DataBundle:
    if name in ("cifar10", "cifar100"):
        return build_cifar(name, root, download)
    if name == "tinyimagenet":
        return build_tinyimagenet(root, download)
    if name == "imagenet":
        return build_imagenet(root)
    if name in ("mnist", "fashionmnist"):
        return build_mnist(name, root, download)
    if name == "digits":
        return build_digits()
    return build_synthetic(synthetic)


def build(name: str, root: str = "./data", download: bool = False, train_subset: int | None = None,
          test_subset: int | None = None, synthetic: dict | None = None, holdout: int | float = 0) -> DataBundle:
    """Build the :class:`DataBundle` of dataset ``name``.

    ``train_subset``/``test_subset`` keep a fixed, seed-independent, class-balanced
    choice of ``min(N, size)`` examples (same choice for the dataset and its arrays).
    ``synthetic`` overrides the synthetic set's options (``num_classes``,
    ``train_size``, ``test_size``, ``image_size``) and is only accepted for it.
    ``holdout`` sets that many (or that fraction of the) class-balanced training images aside as ``bundle.holdout``
    (see :func:`datasets.core.split_holdout`), after the subset is taken.
    Raises :class:`DatasetNotFoundError` when the data is missing or unreadable.
    """
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(NAMES)}")
    if synthetic is not None and name != "synthetic":
        raise ValueError(f"synthetic options only apply to dataset 'synthetic', not {name!r}")
    bundle = _build_full(name, str(root), download, synthetic)
    bundle.train, bundle.train_arrays = take_subset(bundle.train, bundle.train_arrays, train_subset)
    bundle.test, bundle.test_arrays = take_subset(bundle.test, bundle.test_arrays, test_subset)
    return split_holdout(bundle, holdout) if holdout else bundle

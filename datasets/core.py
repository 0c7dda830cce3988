"""Shared pieces of the data layer: the bundle type, the error type, subsets and crops."""

from __future__ import annotations

import copy
import dataclasses
import numbers

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset


class DatasetNotFoundError(RuntimeError):
    """A dataset is missing or unreadable on disk (and was not, or cannot be, downloaded)."""


def not_found(name: str, path, layout: str, hint: str) -> DatasetNotFoundError:
    """One-line error naming the dataset, the path looked at, the expected layout and a hint."""
    return DatasetNotFoundError(f"{name} dataset not found or unreadable at '{path}': expected {layout}; {hint}")


@dataclasses.dataclass
class DataBundle:
    """Everything the training engine needs to know about one dataset.

    ``train``/``test`` yield ``(float32 CHW tensor, int label)`` with the train
    augmentation / eval transform applied. ``train_arrays``/``test_arrays`` are the
    raw, unaugmented ``(uint8 N,C,H,W, int64 N)`` tensors of in-memory datasets and
    ``None`` for disk-backed ones. ``holdout``/``holdout_arrays`` (see :func:`split_holdout`)
    are training images set aside, served through the eval transform. ``source`` says where
    the data was read from (a folder, or how it was made), for the banner and the run's record.
    """

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: Dataset
    test: Dataset
    train_arrays: tuple[Tensor, Tensor] | None
    test_arrays: tuple[Tensor, Tensor] | None
    crop_padding: int
    flip: bool
    holdout: Dataset | None = None
    holdout_arrays: tuple[Tensor, Tensor] | None = None
    source: str | None = None


def balanced_subset(targets: Tensor, n: int) -> Tensor:
    """Sorted indices of a fixed, seed-independent, class-balanced choice of ``min(n, len)`` examples.

    A permutation drawn with generator seed 0 is reordered round-robin over the
    classes (every class's first member, then every class's second, ...), and the
    first ``n`` entries are kept, so each class gets ``n // num_classes`` or one more
    (as far as the class has examples).
    """
    if n < 1:
        raise ValueError(f"subset size must be a positive integer, got {n}")
    perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    labels = targets[perm]
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    group_start = torch.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - group_start
    round_robin = perm[torch.argsort(rank, stable=True)]
    return round_robin[:n].sort().values


def targets_of(dataset: Dataset) -> Tensor:
    """The labels of a dataset with a ``targets`` list, through any chain of ``Subset``s."""
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.as_tensor(dataset.targets)


def take_subset(dataset: Dataset, arrays: tuple[Tensor, Tensor] | None, n: int | None):
    """Apply :func:`balanced_subset` of size ``n`` to a dataset and its arrays (``n=None`` keeps all)."""
    if n is None:
        return dataset, arrays
    return _select(dataset, arrays, balanced_subset(targets_of(dataset), n))


def _select(dataset: Dataset, arrays, idx: Tensor):
    if arrays is not None:
        arrays = (arrays[0][idx], arrays[1][idx])
    return Subset(dataset, idx.tolist()), arrays


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of ``dataset`` (through any chain of ``Subset``s) serving its items through ``transform``."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    dataset = copy.copy(dataset)
    dataset.transform = transform
    return dataset


def eval_transform(dataset: Dataset):
    """The transform a dataset (or the dataset under its ``Subset``s) serves items through."""
    return eval_transform(dataset.dataset) if isinstance(dataset, Subset) else dataset.transform


def split_holdout(bundle: DataBundle, n: int | float) -> DataBundle:
    """``bundle`` with a fixed, class-balanced choice of ``n`` training images moved to ``holdout``.

    ``n`` is a count (an integer), or a fraction of the training split when strictly between
    0 and 1 (rounded, at least one image); a count outside ``1..len - 1`` raises ``ValueError``
    naming ``n``. The held-out images leave the training split and are served unaugmented,
    through the test split's transform (e.g. KDCL-General's ensemble weights are fitted on them).
    """
    targets = targets_of(bundle.train)
    size = len(targets)
    count = max(1, round(n * size)) if 0 < n < 1 else n
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if not isinstance(count, numbers.Integral) or not 0 < count < size:
        given = f"holdout {n!r}" + (f" ({count} images)" if 0 < n < 1 else "")
        raise ValueError(f"{given} must be a count between 1 and {size - 1} or a fraction between 0 and 1 "
                         f"(the training split has {size} images)")
    held = balanced_subset(targets, int(count))
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[held] = False
    train, train_arrays = _select(bundle.train, bundle.train_arrays, keep.nonzero().flatten())
    holdout, holdout_arrays = _select(with_transform(bundle.train, eval_transform(bundle.test)),
                                      bundle.train_arrays, held)
    return dataclasses.replace(bundle, train=train, train_arrays=train_arrays,
                               holdout=holdout, holdout_arrays=holdout_arrays)


def gather_crops(padded: Tensor, top: Tensor, left: Tensor, height: int, width: int,
                 flip: Tensor | None = None) -> Tensor:
    """Per-image crops of a batch in one indexing op: image ``b`` gets the window at ``(top[b], left[b])``.

    ``padded`` is ``(B, C, H', W')``; ``top``/``left`` are ``(B,)`` integer tensors; where
    the optional boolean ``flip`` is true, the crop is mirrored horizontally. Returns a
    contiguous ``(B, C, height, width)`` tensor.
    """
    b, c = padded.shape[:2]
    dev = padded.device
    rows = top[:, None] + torch.arange(height, device=dev)
    cols = left[:, None] + torch.arange(width, device=dev)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]

"""Epoch-seeded train/test loaders over a :class:`DataBundle`.

Both loader kinds share one contract: iterating yields ``(images, targets)`` on the
target device (normalised float32 NCHW, int64), ``len(loader)`` is the number of
batches per epoch, and ``loader.set_epoch(epoch)`` fixes the epoch. Two options of the
training loader: ``views=K`` draws K independent augmentations of every batch, stacked
view-major along dim 0 (``images.chunk(K)[k]`` is view k of the whole batch);
``with_index=True`` also yields each sample's index in the training split (a third
element, e.g. for CRD's memory of embeddings). The sample order
and every random augmentation of an epoch are a function of ``(seed, epoch)`` (and the
rank) only, so resuming at epoch ``e`` reproduces it exactly without saved loader state.

Sharding: the train split is permuted identically on every rank, padded by wrapping
around to a multiple of ``world_size`` (like ``DistributedSampler``) and dealt
``rank::world_size``; the test split is unshuffled and dealt ``rank::world_size``
without padding, so metrics summed over ranks are exact. Both kinds use the same
order, so for the same arguments they visit the same samples in the same sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .core import DataBundle, gather_crops

LOADERS = ("torch", "tensor")


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative integers (e.g. seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def shard_indices(n: int, *, train: bool, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's sample indices for one epoch (see the module docstring for the rules)."""
    if not train:
        return torch.arange(n)[rank::world_size]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    total = math.ceil(n / world_size) * world_size
    return order.repeat(math.ceil(total / n))[:total][rank::world_size]


class _SeededSampler(Sampler):
    """Yields ``(index, sample_seed)`` pairs of this rank's shard for the current epoch."""

    def __init__(self, n: int, train: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.train, self.seed, self.rank, self.world_size = n, train, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) if self.train else len(range(self.rank, self.n, self.world_size))

    def __iter__(self):
        idx = shard_indices(self.n, train=self.train, seed=self.seed, epoch=self.epoch,
                            rank=self.rank, world_size=self.world_size)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        seeds = torch.randint(0, 2**62, (len(idx),), generator=gen)
        return iter(zip(idx.tolist(), seeds.tolist()))


class _SeededItems(Dataset):
    """Fetches item ``(index, seed)`` with the CPU RNG seeded to ``seed``, restoring the caller's RNG.

    Per-sample seeds make the augmentation independent of worker count, worker
    assignment and worker lifetime (persistent workers keep no RNG history that matters).
    With ``views`` > 1 the item holds that many transforms of the image, stacked; with
    ``with_index`` it also holds the index.
    """

    def __init__(self, dataset: Dataset, views: int = 1, with_index: bool = False) -> None:
        self.dataset, self.views, self.with_index = dataset, views, with_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            items = [self.dataset[index] for _ in range(self.views)]
        image = items[0][0] if self.views == 1 else torch.stack([image for image, _ in items])
        return (image, items[0][1], index) if self.with_index else (image, items[0][1])


class TorchLoader:
    """``torch.utils.data.DataLoader`` over a bundle split with epoch-seeded order and augmentation.

    The DataLoader gets a private generator (reseeded in :meth:`set_epoch`) so that
    drawing its worker base seed never consumes the caller's global RNG.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, train: bool, device: torch.device, workers: int,
                 seed: int, rank: int, world_size: int, drop_last: bool, views: int = 1,
                 with_index: bool = False) -> None:
        self.sampler = _SeededSampler(len(dataset), train, seed, rank, world_size)
        self.device, self.views = device, views
        self.generator = torch.Generator().manual_seed(mix_seed(seed, 0, rank))
        self.loader = DataLoader(
            _SeededItems(dataset, views, with_index), batch_size=batch_size, sampler=self.sampler,
            num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda", drop_last=drop_last,
            generator=self.generator,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(mix_seed(self.sampler.seed, epoch, self.sampler.rank))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, *rest in self.loader:
            if self.views > 1:  # (B, K, C, H, W) -> view-major (K * B, C, H, W)
                images = images.transpose(0, 1).flatten(0, 1)
            yield images.to(self.device, non_blocking=True), *(t.to(self.device, non_blocking=True) for t in rest)


class TensorLoader:
    """Whole uint8 split kept as one tensor on ``device``; crop/flip/normalise done per batch on the device.

    The train augmentation matches torchvision's ``RandomCrop(size, padding=p)`` (zero
    padding, offsets uniform in ``0..2p`` per image) followed by
    ``RandomHorizontalFlip(0.5)`` when enabled, vectorised across the batch.
    """

    def __init__(self, arrays, batch_size: int, *, train: bool, padding: int, flip: bool, mean, std,
                 device: torch.device, seed: int, rank: int, world_size: int, drop_last: bool, views: int = 1,
                 with_index: bool = False) -> None:
        self.images, self.targets = (t.to(device) for t in arrays)
        self.batch_size, self.train, self.padding, self.flip = batch_size, train, padding, flip
        self.views, self.with_index = views, with_index
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.device, self.seed, self.rank, self.world_size = device, seed, rank, world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_samples(self) -> int:
        n = len(self.targets)
        return math.ceil(n / self.world_size) if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Crop offsets and flips drawn on the CPU (a few bytes a batch), so that every device
        draws the same augmentation for the same seed; applied on the device."""
        b, _, h, w = x.shape
        p = self.padding
        top = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(self.device, non_blocking=True)
        left = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(self.device, non_blocking=True)
        flip = (torch.rand(b, generator=gen) < 0.5).to(self.device, non_blocking=True) if self.flip else None
        return gather_crops(F.pad(x, (p, p, p, p)), top, left, h, w, flip)

    def __iter__(self):
        idx = shard_indices(len(self.targets), train=self.train, seed=self.seed, epoch=self.epoch,
                            rank=self.rank, world_size=self.world_size).to(self.device)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = idx[start:start + self.batch_size]
            x = self.images[batch]
            if self.train:
                x = torch.cat([self._augment(x, gen) for _ in range(self.views)])
            x = x.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)
            yield (x, self.targets[batch], batch) if self.with_index else (x, self.targets[batch])


class Loaders(NamedTuple):
    """The loaders of one bundle: training, test and (when the bundle has one) held-out split."""

    train: TorchLoader | TensorLoader
    test: TorchLoader | TensorLoader
    holdout: TorchLoader | TensorLoader | None = None


def make_loaders(bundle: DataBundle, batch_size: int, test_batch_size: int, loader: str = "torch",
                 device="cpu", workers: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, views: int = 1, with_index: bool = False) -> Loaders:
    """The :class:`Loaders` of kind ``loader`` ("torch" or "tensor").

    ``drop_last``, ``views`` and ``with_index`` apply to the training loader (see the
    module docstring); the held-out split, if any, is loaded like the test split.
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; accepted: {', '.join(LOADERS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
    if views < 1:
        raise ValueError(f"views must be a positive integer, got {views}")
    device = torch.device(device)
    shard = dict(device=device, seed=seed, rank=rank, world_size=world_size)
    train = dict(train=True, drop_last=drop_last, views=views, with_index=with_index)
    if loader == "torch":
        def make(dataset, batch, **options):
            return TorchLoader(dataset, batch, workers=workers, **shard, **options)
        splits = bundle.train, bundle.test, bundle.holdout
    else:
        if bundle.train_arrays is None or bundle.test_arrays is None:
            raise ValueError("--loader tensor needs an in-memory dataset (cifar10, cifar100, mnist, fashionmnist, "
                             "digits, synthetic); "
                             f"{bundle.name!r} is disk-backed: use --loader torch")

        def make(arrays, batch, **options):
            return TensorLoader(arrays, batch, padding=bundle.crop_padding, flip=bundle.flip, mean=bundle.mean,
                                std=bundle.std, **shard, **options)
        splits = bundle.train_arrays, bundle.test_arrays, bundle.holdout_arrays
    evaluation = dict(train=False, drop_last=False)
    return Loaders(make(splits[0], batch_size, **train), make(splits[1], test_batch_size, **evaluation),
                   None if splits[2] is None else make(splits[2], test_batch_size, **evaluation))

"""Contrastive sampling for CRD (Tian et al., ICLR 2020): a positive and K negatives per sample.

:class:`ContrastSampler` draws, for each training sample of a batch, the indices of the
rows of CRD's memory its embedding is contrasted with: column 0 the positive, columns
1..K the negatives, all indices into the training split (what the training loader yields
with ``with_index=True``). It follows the CRD reference code's CIFAR loader
(RepDistiller ``dataset/cifar100.py``, ``CIFAR100InstanceSample``):

* ``exact`` mode (its default): the positive is the sample itself; ``relax``: a random
  sample of the same class;
* the negatives are drawn uniformly from the samples of the *other* classes (the labels
  are used: a same-class sample is never a negative), without replacement, or with
  replacement when K exceeds the number of other-class samples (the reference's rule).

Unlike the reference, which draws in its DataLoader workers with NumPy's global RNG, the
draw is a function of ``(seed, epoch, iteration, rank)`` only: a resumed run draws the
same negatives without saved RNG state. It runs on the device of the targets, vectorised
over the batch: B x N uniform keys, the K smallest among each sample's other-class
samples (a uniform K-subset), so its cost is O(B N) per batch (N the training split).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import DataBundle, targets_of
from .loaders import mix_seed

CONTRAST_MODES = ("exact", "relax")


def train_targets(bundle: DataBundle) -> Tensor:
    """The labels of the training split, in the order of the indices the training loader yields."""
    return bundle.train_arrays[1] if bundle.train_arrays is not None else targets_of(bundle.train)


class ContrastSampler:
    """``sampler(indices, k, seed=, epoch=, iteration=)`` -> (B, 1 + k) training-split indices.

    ``targets`` are the training split's labels (:func:`train_targets`); the draws happen on
    their device. See the module docstring.
    """

    def __init__(self, targets: Tensor, mode: str = "exact") -> None:
        if mode not in CONTRAST_MODES:
            raise ValueError(f"unknown contrast mode {mode!r}; accepted: {', '.join(CONTRAST_MODES)}")
        targets = torch.as_tensor(targets).long()
        if targets.dim() != 1 or len(targets) < 2:
            raise ValueError("targets must be a 1-D tensor of two or more labels")
        self.mode, self.targets = mode, targets
        self.order = torch.argsort(targets, stable=True)         # the split sorted by class
        counts = torch.bincount(targets)
        if (counts > 0).sum() < 2:
            raise ValueError("contrastive sampling needs two or more classes in the training split")
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts          # first position of each class in ``order``

    def __len__(self) -> int:
        return len(self.targets)

    def negatives(self, labels: Tensor, k: int, gen: torch.Generator) -> Tensor:
        """(B, k) indices of samples whose class differs from ``labels`` (see the module docstring)."""
        n, b, device = len(self.targets), len(labels), self.targets.device
        start, count = self.starts[labels], self.counts[labels]
        pool = n - count                                        # other-class samples of each row
        replace = k > pool
        if k <= n:
            keys = torch.rand(b, n, generator=gen, device=device)
            keys.masked_fill_(torch.arange(n, device=device) >= pool[:, None], 2.0)
            position = keys.topk(k, dim=1, largest=False).indices
        if replace.any():
            drawn = (torch.rand(b, k, generator=gen, device=device) * pool[:, None]).long()
            drawn = torch.minimum(drawn, pool[:, None] - 1)     # float rounding at the top end
            position = drawn if k > n else torch.where(replace[:, None], drawn, position)
        # position p among the other-class samples -> position in ``order``: skip the row's own class
        position = position + count[:, None] * (position >= start[:, None])
        return self.order[position]

    def __call__(self, indices: Tensor, k: int, *, seed: int, epoch: int, iteration: int, rank: int = 0) -> Tensor:
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        indices = indices.to(self.targets.device).long()
        gen = torch.Generator(device=self.targets.device).manual_seed(mix_seed(seed, epoch, iteration, rank))
        labels = self.targets[indices]
        if self.mode == "exact":
            positive = indices
        else:
            offset = (torch.rand(len(indices), generator=gen, device=indices.device) * self.counts[labels]).long()
            positive = self.order[self.starts[labels] + torch.minimum(offset, self.counts[labels] - 1)]
        return torch.cat([positive[:, None], self.negatives(labels, k, gen)], dim=1)

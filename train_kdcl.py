"""KDCL: Online Knowledge Distillation via Collaborative Learning (Guo et al., CVPR 2020).

Two or more networks train from scratch together. Every network sees its own random
augmentation of the same images (KDCL's invariant collaborative learning); their logits
are combined into one ensemble soft target z_m, and each network i learns from the
labels and from that target (Table 1 of the SwitOKD paper, lambda = 1)::

    L_i = CE(y, p_i^1) + lambda tau^2 KL(p_m^tau || p_i^tau),   p_m = softmax(z_m / tau), z_m detached

Example::

    python train_kdcl.py --dataset digits --models resnet20 wrn_16_2 --epochs 15

Ensembles (``--ensemble``), per mini-batch from the detached logits z_1 .. z_m:
``minlogit`` (default) per sample, each network's logits minus its own logit of the
true class, then the element-wise minimum over networks; ``naive`` per sample, the
logits of the network with the lowest cross-entropy on that sample; ``linear`` the
convex combination sum_i a_i z_i whose cross-entropy on the batch is lowest;
``general`` sum_i w_i z_i with w = C^-1 1 / (1' C^-1 1), C_ij the mean inner product
of the probability errors p_i - y and p_j - y on a held-out part of the training set
(``--holdout`` images, never trained on), recomputed at the start of every epoch.
Roles and ``--roles`` as in train_dml.py.
"""
import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

import utils
from datasets.core import balanced_subset
from datasets.loaders import TensorLoader, TorchLoader
from train_dml import add_cohort_flags, cohort
from train_switokd import distillation_loss

ENSEMBLES = ("minlogit", "naive", "linear", "general")


# --------------------------------------------------------------------------- the ensembles

def min_logit_ensemble(logits, targets):
    """KDCL-MinLogit: z_m(c) = min_i (z_i(c) - z_i(y)), element-wise per sample; zero at the true class."""
    stacked = torch.stack(logits)                                      # (m, B, C)
    true = stacked.gather(2, targets.view(1, -1, 1).expand(len(logits), -1, 1))
    return (stacked - true).min(dim=0).values


def naive_ensemble(logits, targets):
    """KDCL-Naive: per sample, the logits of the network with the lowest cross-entropy."""
    stacked = torch.stack(logits)                                      # (m, B, C)
    ce = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in logits])
    best = ce.argmin(dim=0)
    return stacked[best, torch.arange(len(targets), device=targets.device)]


def project_to_simplex(v):
    """The Euclidean projection of ``v`` onto {a : a >= 0, sum a = 1} (sort-based algorithm)."""
    u = v.sort(descending=True).values
    cumulative = u.cumsum(0) - 1
    index = torch.arange(1, len(v) + 1, device=v.device, dtype=v.dtype)
    rho = int((u - cumulative / index > 0).nonzero().max())
    return (v - cumulative[rho] / (rho + 1)).clamp(min=0)


def linear_weights(logits, targets, iterations=100, tolerance=1e-12):
    """KDCL-Linear: argmin over the simplex of CE(sum_i a_i z_i, y), batch mean.

    The problem is convex; solved in float64 by projected gradient descent from the
    uniform weights, each step 1 / (the largest curvature of the CE along the simplex,
    from its exact Hessian; a Newton step for two networks), halved until it decreases
    the objective enough (Armijo). Deterministic.
    """
    z = torch.stack([t.detach().double() for t in logits])            # (m, B, C)
    m, batch = z.shape[:2]
    onehot = F.one_hot(targets, z.size(2)).to(z.dtype)
    tangent = torch.eye(m, dtype=z.dtype, device=z.device) - 1.0 / m  # projector onto sum(d) = 0

    def objective(w):
        return F.cross_entropy(torch.einsum("m,mbc->bc", w, z), targets)

    a = torch.full((m,), 1.0 / m, dtype=z.dtype, device=z.device)
    value = objective(a)
    for _ in range(iterations):
        p = F.softmax(torch.einsum("m,mbc->bc", a, z), dim=1)
        gradient = torch.einsum("bc,mbc->m", p - onehot, z) / batch
        mean_z = torch.einsum("mbc,bc->mb", z, p)
        hessian = (torch.einsum("ibc,jbc->ij", z * p, z) - mean_z @ mean_z.T) / batch
        step = 1.0 / torch.linalg.eigvalsh(tangent @ hessian @ tangent).max().clamp(min=1e-12)
        while True:
            candidate = project_to_simplex(a - step * gradient)
            new_value = objective(candidate)
            if new_value <= value - 1e-4 * gradient.dot(a - candidate):
                break
            step = step / 2
            if step < 1e-12:
                return a.to(logits[0].dtype)
        improvement = value - new_value
        a, value = candidate, new_value
        if improvement <= tolerance:
            break
    return a.to(logits[0].dtype)


def general_weights(errors_gram):
    """KDCL-General: w = C^-1 1 / (1' C^-1 1), minimising the held-out error w' C w subject to sum w = 1.

    ``errors_gram`` is C, C_ij = mean over held-out samples of <p_i - y, p_j - y>. A
    pseudo-inverse keeps the weights finite when two networks' errors coincide.
    """
    c = errors_gram.double()
    ones = torch.ones(len(c), dtype=c.dtype, device=c.device)
    raw = torch.linalg.pinv(c, hermitian=True) @ ones
    return (raw / raw.sum()).float()


def weighted_ensemble(logits, weights):
    """sum_i w_i z_i (KDCL-Linear and KDCL-General)."""
    return torch.einsum("m,mbc->bc", weights.to(logits[0].dtype), torch.stack(logits))


def ensemble_target(kind, logits, targets, weights=None):
    """The detached ensemble logits z_m of ``kind`` and the weights used (None for the per-sample kinds)."""
    logits = [z.detach() for z in logits]
    if kind == "minlogit":
        return min_logit_ensemble(logits, targets), None
    if kind == "naive":
        return naive_ensemble(logits, targets), None
    if kind == "linear":
        weights = linear_weights(logits, targets)
    elif kind != "general":
        raise ValueError(f"unknown ensemble {kind!r}; choose from {', '.join(ENSEMBLES)}")
    return weighted_ensemble(logits, weights), weights


def kdcl_loss(logits, ensemble_logits, targets, lam=1.0, tau=2.0):
    """L_i = CE(y, p_i^1) + lambda tau^2 KL(p_m^tau || p_i^tau) (Table 1 of the SwitOKD paper).

    Returns (total, CE term, KL term before lambda).
    """
    ce = F.cross_entropy(logits, targets)
    kl = distillation_loss(ensemble_logits, logits, tau)
    return ce + lam * kl, ce, kl


@torch.no_grad()
def held_out_error_gram(nets, loader, run):
    """C_ij = mean over the held-out images of <p_i - y, p_j - y> (softmax at tau = 1, eval mode)."""
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    total = torch.zeros(len(nets), len(nets), dtype=torch.float64, device=run.device)
    count = 0
    for images, targets in loader:
        with run.autocast():
            errors = [F.softmax(net(images).float(), dim=1) - F.one_hot(targets, run.data.num_classes)
                      for net in nets]
        e = torch.stack(errors).double()                              # (m, B, C)
        gram = torch.einsum("ibc,jbc->ij", e, e)
        total += gram
        count += len(targets)
    for net, mode in zip(nets, modes):
        net.train(mode)
    stats = torch.cat([total.flatten(), total.new_tensor([count])])
    stats = run.all_reduce_mean(stats)
    return (stats[:-1] / stats[-1]).view(len(nets), len(nets))


# --------------------------------------------------------------------------- data: one view per network

class MultiViewTensorLoader(TensorLoader):
    """The tensor loader, yielding ``views`` independent crop/flip draws of each batch along dim 0."""

    def __init__(self, *args, views: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.views = views

    def _augment(self, x, gen):
        return torch.cat([super(MultiViewTensorLoader, self)._augment(x, gen) for _ in range(self.views)])


class _Views(Dataset):
    """Item i is (``views`` independent transforms of image i stacked, label)."""

    def __init__(self, dataset, views):
        self.dataset, self.views = dataset, views

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        items = [self.dataset[index] for _ in range(self.views)]
        return torch.stack([image for image, _ in items]), items[0][1]


class MultiViewTorchLoader(TorchLoader):
    """The DataLoader path, yielding ``views`` transforms of each batch, stacked along dim 0."""

    def __init__(self, dataset, *args, views: int, **kwargs):
        super().__init__(_Views(dataset, views), *args, **kwargs)

    def __iter__(self):
        for images, targets in super().__iter__():                    # images: (B, views, C, H, W)
            yield images.transpose(0, 1).flatten(0, 1), targets


def _with_transform(dataset, transform):
    """A shallow copy of ``dataset`` (through Subsets) serving items through ``transform``."""
    if isinstance(dataset, Subset):
        return Subset(_with_transform(dataset.dataset, transform), dataset.indices)
    dataset = copy.copy(dataset)
    dataset.transform = transform
    return dataset


def _targets(dataset):
    if isinstance(dataset, Subset):
        return torch.as_tensor(_targets(dataset.dataset))[torch.as_tensor(dataset.indices)]
    return torch.as_tensor(dataset.targets)


def _eval_transform(dataset):
    return _eval_transform(dataset.dataset) if isinstance(dataset, Subset) else dataset.transform


def collaborative_loaders(run, views, holdout):
    """A train loader with ``views`` augmentations per batch and, when ``holdout``, a held-out eval loader.

    The held-out images are a fixed, class-balanced choice (``datasets.core.balanced_subset``),
    removed from training and served unaugmented, as the test split is.
    """
    data, args = run.data, run.args
    tensor = isinstance(run.train_loader, TensorLoader)
    batch = run.train_loader.batch_size if tensor else run.train_loader.loader.batch_size
    test_batch = run.test_loader.batch_size if tensor else run.test_loader.loader.batch_size
    targets = data.train_arrays[1] if tensor else _targets(data.train)
    shard = dict(device=run.device, seed=args.seed, rank=run.rank, world_size=run.world_size)

    train_idx, held_idx = torch.arange(len(targets)), None
    if holdout:
        if not 0 < holdout < len(targets):
            raise utils.UsageError(f"--holdout {holdout} must be between 1 and {len(targets) - 1} "
                                   f"(the training set has {len(targets)} images)")
        held_idx = balanced_subset(targets, holdout)
        keep = torch.ones(len(targets), dtype=torch.bool)
        keep[held_idx] = False
        train_idx = keep.nonzero().flatten()

    if tensor:
        images, labels = data.train_arrays
        common = dict(padding=data.crop_padding, flip=data.flip, mean=data.mean, std=data.std, **shard)
        train = MultiViewTensorLoader((images[train_idx], labels[train_idx]), batch, train=True,
                                      drop_last=False, views=views, **common)
        held = None if held_idx is None else TensorLoader(
            (images[held_idx], labels[held_idx]), test_batch, train=False, drop_last=False, **common)
        return train, held
    common = dict(workers=args.workers, **shard)
    train = MultiViewTorchLoader(Subset(data.train, train_idx.tolist()), batch, train=True, drop_last=False,
                                 views=views, **common)
    held = None if held_idx is None else TorchLoader(
        Subset(_with_transform(data.train, _eval_transform(data.test)), held_idx.tolist()), test_batch,
        train=False, drop_last=False, **common)
    return train, held


# --------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = utils.common_parser(__doc__.splitlines()[0])
    add_cohort_flags(p)
    g = p.add_argument_group("KDCL")
    g.add_argument("--ensemble", default="minlogit", choices=ENSEMBLES, help="how the soft target is built")
    g.add_argument("--tau", type=utils.positive(float), default=2.0, help="distillation temperature")
    g.add_argument("--lam", type=float, default=1.0, help="weight lambda of the KL term")
    g.add_argument("--holdout", type=utils.positive(int), metavar="N",
                   help="held-out training images for --ensemble general (default: 10%% of the training set)")
    g.add_argument("--shared-augmentation", action="store_true",
                   help="every network sees the same augmented batch (no invariant collaborative learning)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    networks = cohort(args)
    if args.holdout is not None and args.ensemble != "general":
        raise utils.UsageError(f"--holdout applies to --ensemble general only, not {args.ensemble}")
    run = utils.Run(args, "kdcl", networks)
    roles = list(networks)
    nets = [run.nets[role] for role in roles]
    optimizers = [run.optimizers[role] for role in roles]
    views = 1 if args.shared_augmentation else len(nets)

    holdout = None
    if args.ensemble == "general":
        holdout = args.holdout or max(1, round(0.1 * len(run.data.train)))
    run.train_loader, holdout_loader = collaborative_loaders(run, views, holdout)
    run.global_step = run.epoch * len(run.train_loader)

    weights = None
    for _ in run.epochs():
        extra = {}
        if holdout_loader is not None:
            weights = general_weights(held_out_error_gram(nets, holdout_loader, run))
            extra = {f"ensemble/w_{role}": w for role, w in zip(roles, weights.tolist())}
        for images, targets in run.train_batches():
            start = time.perf_counter()
            inputs = images.chunk(views)
            with run.autocast():
                logits = [net(inputs[k % views]).float() for k, net in enumerate(nets)]
            z_m, used = ensemble_target(args.ensemble, logits, targets, weights)
            losses = [kdcl_loss(z, z_m, targets, args.lam, args.tau) for z in logits]
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            run.backward(sum(total for total, _, _ in losses))
            run.step(*optimizers)
            run.synchronize()

            values = {"ensemble_ce": F.cross_entropy(z_m, targets)}
            for role, (_, ce, kl) in zip(roles, losses):
                values.update({f"{role}_ce": ce, f"{role}_kl": kl})
            if args.ensemble == "linear":
                values.update({f"w_{role}": w for role, w in zip(roles, used)})
            values["seconds"] = time.perf_counter() - start
            run.log_iteration(values)
        run.end_epoch(extra)

    return run.finish({"kdcl": {
        "ensemble": args.ensemble, "tau": args.tau, "lam": args.lam,
        "augmentation": "shared" if args.shared_augmentation else "per-network",
        "holdout": holdout,
        "general_weights": None if weights is None else dict(zip(roles, weights.tolist())),
    }})


if __name__ == "__main__":
    utils.main_guard(main)

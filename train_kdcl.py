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
import utils  # first: Ctrl-C during the slow imports then ends quietly

import torch
import torch.nn.functional as F

from distill import kl_loss

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
    kl = kl_loss(ensemble_logits, logits, tau)
    return ce + lam * kl, ce, kl


@torch.no_grad()
def held_out_error_gram(nets, loader, precision):
    """C_ij = mean over the held-out images of <p_i - y, p_j - y> (softmax at tau = 1, eval mode)."""
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    total, count = 0.0, 0
    for images, targets in loader:
        with precision.autocast():
            logits = [net(images).float() for net in nets]
        e = torch.stack([F.softmax(z, dim=1) - F.one_hot(targets, z.size(1)) for z in logits]).double()  # (m, B, C)
        total = total + torch.einsum("ibc,jbc->ij", e, e)
        count += len(targets)
    for net, mode in zip(nets, modes):
        net.train(mode)
    stats = utils.all_reduce_mean(torch.cat([total.flatten(), total.new_tensor([count])]))
    return (stats[:-1] / stats[-1]).view(len(nets), len(nets))


def train_step(nets, optimizers, images, targets, views, ensemble, weights, tau, lam, precision):
    """One iteration of KDCL: each network on its own view, the ensemble target, one backward.

    ``images`` holds ``views`` augmentations of the batch, view-major; network k sees view
    k mod ``views``. Returns the logged values (device tensors), by role.
    """
    roles = list(nets)
    inputs = images.chunk(views)
    with precision.autocast():
        logits = [nets[role](inputs[k % views]).float() for k, role in enumerate(roles)]
    z_m, used = ensemble_target(ensemble, logits, targets, weights)
    losses = [kdcl_loss(z, z_m, targets, lam, tau) for z in logits]
    for role in roles:
        optimizers[role].zero_grad(set_to_none=True)
    precision.backward(sum(total for total, _, _ in losses))
    precision.step(*(optimizers[role] for role in roles))
    values = {"ensemble_ce": F.cross_entropy(z_m, targets)}
    for role, (_, ce, kl) in zip(roles, losses):
        values.update({f"{role}/ce": ce, f"{role}/kl": kl})
    if ensemble == "linear":
        values.update({f"w_{role}": w for role, w in zip(roles, used)})
    return values


# --------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    utils.add_cohort_flags(p)
    g = p.method_group("KDCL")
    g.add_argument("--ensemble", default="minlogit", choices=ENSEMBLES, help="how the soft target is built")
    g.add_argument("--tau", type=utils.POSITIVE, default=2.0, help="distillation temperature")
    g.add_argument("--lam", type=utils.NON_NEGATIVE, default=1.0, help="weight lambda of the KL term")
    g.add_argument("--holdout", type=utils.POSITIVE_INT, metavar="N",
                   help="held-out training images for --ensemble general (default: 10%% of the training set)")
    g.add_argument("--shared-augmentation", action="store_true",
                   help="every network sees the same augmented batch (no invariant collaborative learning)")
    utils.add_common_flags(p)
    args = utils.parse_args(p, argv)
    if args.holdout is not None and args.ensemble != "general":
        p.error(f"--holdout applies to --ensemble general only, not {args.ensemble}")
    return args


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    networks = utils.cohort(args.models, args.roles)
    views = 1 if args.shared_augmentation else len(networks)
    holdout = (args.holdout or 0.1) if args.ensemble == "general" else 0
    run = utils.Run(args, "kdcl", networks, script="three-networks" if len(networks) == 3 else None,
                    data_options={"views": views, "holdout": holdout})
    nets = [run.nets[role] for role in networks]

    for epoch in run.epochs():
        extra = {}
        if args.ensemble == "general":  # KDCL-General: weights from the held-out errors, once per epoch
            run.state["general_weights"] = general_weights(
                held_out_error_gram(nets, run.loaders.holdout, run.precision)).tolist()
            extra = {f"ensemble/w_{role}": w for role, w in zip(networks, run.state["general_weights"])}
        weights = torch.tensor(run.state["general_weights"], device=run.device) \
            if "general_weights" in run.state else None
        for images, targets in run.train_batches():
            run.log(train_step(run.nets, run.optimizers, images, targets, views, args.ensemble, weights,
                               args.tau, args.lam, run.precision))
        run.step_schedulers()
        metrics = run.evaluate()
        run.end_epoch(metrics, extra)

    return run.finish({"kdcl": {
        "ensemble": args.ensemble, "tau": args.tau, "lam": args.lam,
        "augmentation": "shared" if args.shared_augmentation else "per-network",
        "holdout": len(run.data.holdout) if holdout else 0,
        "general_weights": dict(zip(networks, run.state["general_weights"])) if "general_weights" in run.state
        else None}})


if __name__ == "__main__":
    utils.main_guard(main)

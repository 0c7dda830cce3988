"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen et al., AAAI 2020), as released.

One model of m = 4 branches on a shared trunk (or, ``--network-based``, m independent networks):
branches 0..m-2 are auxiliary peers, branch m-1 is the group leader, the network deployed.
Two-level distillation (docs/OKDDIP.md; the release's ``train_GL.py``, R2.1)::

    L = sum_i CE(z_i, y) + CE(z_L, y) + alpha w(e) [ sum_i KL_T(x_i || z_i) + KL_T(x_L || z_L) ]
    x_i = sum_j A_ij z_j   (peer i's attention over the peers 0..m-2, self included)
    x_L = mean_i z_i       (the leader learns from the peers' mean logits)

with the release's KL (T = 3, T^2 inside, +1e-7 on the targets), the ramp w(e) = exp(-5 (1 - e/80)^2)
of the 0-based epoch e, and NO target detached: W_Q and W_K of the attention learn only through the
peers' targets (``--detach-targets`` freezes them). Example::

    python train_okddip.py --dataset digits --backbone resnet32 --epochs 15

Reported, as the release: the leader's top-1 (``net``; ``best_net.pt`` is kept at its best
epoch). Also evaluated every epoch: each peer, the peers' ensemble (mean of the peers' logits,
leader excluded), the peers' mean accuracy and the release's diversity ``dist``.
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import os

import torch
import torch.nn.functional as F

import models
from distill import DiversityMeter, consistency_weight, okddip_kl


# --------------------------------------------------------------------------- the method

def peer_targets(peer_logits, attention):
    """x_i = sum_j A_ij z_j: each peer's target logits, the attention-weighted peers' logits (R1.5).

    ``peer_logits`` (m-1, B, C), ``attention`` (B, m-1, m-1) with rows on the simplex; returns (m-1, B, C).
    Logits are mixed, not probabilities (the release; the paper mixes softened probabilities).
    """
    return torch.einsum("bij,jbc->ibc", attention, peer_logits)


def leader_target(peer_logits):
    """x_L = (1/(m-1)) sum_i z_i: the leader's target logits, the mean of the peers' logits (R2.1)."""
    return peer_logits.mean(0)


def okddip_loss(logits, attention, targets, weight, alpha=1.0, tau=3.0, detach=False):
    """The release's OKDDip loss (R2.1; ``train_GL.py:96-104``)::

        sum_{i<m-1} CE(z_i, y) + CE(z_L, y) + alpha w [ sum_{i<m-1} KL_T(x_i || z_i) + KL_T(x_L || z_L) ]

    ``logits`` (m, B, C), leader last; ``weight`` = w(e). Sums over the peers, not means. The targets
    are live by default (gradient flows into every peer and, through x_i, into W_Q and W_K);
    ``detach=True`` detaches x_i and x_L. Returns (total, CE sum, peers' KL sum, leader's KL).
    """
    peers, leader = logits[:-1], logits[-1]
    x, x_leader = peer_targets(peers, attention), leader_target(peers)
    if detach:
        x, x_leader = x.detach(), x_leader.detach()
    ce = sum(F.cross_entropy(z, targets) for z in logits)
    kl_peers = sum(okddip_kl(x_i, z_i, tau) for x_i, z_i in zip(x, peers))
    kl_leader = okddip_kl(x_leader, leader, tau)
    return ce + alpha * weight * (kl_peers + kl_leader), ce, kl_peers, kl_leader


def train_step(model, optimizer, images, targets, epoch, cfg, precision):
    """One iteration of (1-based) ``epoch``: one forward pass of the whole model, one backward of the
    summed loss, one step. The ramp w(e) takes the 0-based epoch, constant within it (docs/OKDDIP.md R0)."""
    weight = consistency_weight(epoch - 1, cfg.ramp_length)
    with precision.autocast():
        out = model(images)
    total, ce, kl_peers, kl_leader = okddip_loss(out.logits.float(), out.attention.float(), targets, weight,
                                                 cfg.alpha, cfg.tau, cfg.detach_targets)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(total)
    precision.step(optimizer)
    return {"loss": total, "ce": ce, "peers_kl": kl_peers, "leader_kl": kl_leader}


# --------------------------------------------------------------------------- evaluation

def evaluate(run, model):
    """Test metrics of the leader as ``net`` (what the release reports), each peer, ``ensemble`` = the
    mean of the PEERS' logits (leader excluded, as the release) and ``peers_mean`` (their mean
    accuracy); and the release's diversity ``dist`` over the peers, from the same pass."""
    diversity = DiversityMeter()

    def outputs(images):
        z = model(images).logits
        diversity.add(z)
        return {"net": z[-1], **{f"peer{i}": z[i] for i in range(len(z) - 1)}, "ensemble": z[:-1].mean(0)}
    metrics = run.evaluate(outputs)
    metrics["peers_mean"] = utils.mean_metrics([m for name, m in metrics.items() if name.startswith("peer")])
    return metrics, diversity.value(utils.all_reduce_mean)


# --------------------------------------------------------------------------- flags

def model_name(args):
    """The registry name of the model the flags describe, e.g. ``okddip:resnet32`` (models.okddip_name)."""
    return models.okddip_name("okddip-net" if args.network_based else "okddip", args.backbone, args.branches,
                              args.shared_dense_block)


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--network-based", action="store_true",
                       help="m independent networks instead of branches on a shared trunk (the release's "
                            "--MulStu, docs/OKDDIP.md R1.7)")
    utils.add_branch_flags(p, "OKDDip", "m: m-1 auxiliary peers + 1 group leader",
                           "detach x_i and x_L (the attention's W_Q, W_K then never learn; default: live targets, "
                           "as the release)")
    args = utils.parse_branch_args(p, argv)
    if args.detach_targets and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("--detach-targets leaves W_Q and W_K without gradient, which DistributedDataParallel rejects; "
                "run it in one process")
    return args


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    run = utils.Run(args, "okddip", {"net": model_name(args)})
    model, optimizer = run.nets["net"], run.optimizers["net"]

    for epoch in run.epochs():
        for images, targets in run.train_batches():
            run.log(train_step(model, optimizer, images, targets, epoch, args, run.precision))
        run.step_schedulers()
        metrics, diversity = evaluate(run, model)
        run.end_epoch(metrics, {"ramp_weight": consistency_weight(epoch - 1, args.ramp_length), "diversity": diversity})

    return run.finish({"backbone": args.backbone, "okddip": {
        **utils.branch_settings(args), "variant": "network-based" if args.network_based else "branch-based",
        "reported": "net = the group leader (branch m-1), best epoch by its top-1"},
        "measured": run.measured("net", ("diversity",))})


if __name__ == "__main__":
    utils.main_guard(main)

"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen et al., AAAI 2020), as released.

One model of m = 4 branches on a shared trunk (or, ``--network-based``, m independent networks):
branches 0..m-2 are auxiliary peers, branch m-1 is the group leader, the network deployed.
Two-level distillation (docs/OKDDIP.md; the release's ``train_GL.py``, facts Sec. 2.1)::

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
from models.okddip import BACKBONES


# --------------------------------------------------------------------------- the method

def peer_targets(peer_logits, attention):
    """x_i = sum_j A_ij z_j: each peer's target logits, the attention-weighted peers' logits (facts Sec. 1.5).

    ``peer_logits`` (m-1, B, C), ``attention`` (B, m-1, m-1) with rows on the simplex; returns (m-1, B, C).
    Logits are mixed, not probabilities (the release; the paper mixes softened probabilities).
    """
    return torch.einsum("bij,jbc->ibc", attention, peer_logits)


def leader_target(peer_logits):
    """x_L = (1/(m-1)) sum_i z_i: the leader's target logits, the mean of the peers' logits (facts Sec. 2.1)."""
    return peer_logits.mean(0)


def okddip_loss(logits, attention, targets, weight, alpha=1.0, tau=3.0, detach=False):
    """The release's OKDDip loss (facts Sec. 2.1; ``train_GL.py:96-104``)::

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


def train_step(model, optimizer, images, targets, weight, cfg, precision):
    """One iteration: one forward pass of the whole model, one backward of the summed loss, one step."""
    with precision.autocast():
        out = model(images)
    total, ce, kl_peers, kl_leader = okddip_loss(out.logits.float(), out.attention.float(), targets, weight,
                                                 cfg.alpha, cfg.tau, cfg.detach_targets)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(total)
    precision.step(optimizer)
    return {"loss": total, "ce": ce, "peers_kl": kl_peers, "leader_kl": kl_leader}


# --------------------------------------------------------------------------- evaluation

def evaluation_outputs(model, diversity):
    """``outputs(images)`` for ``run.evaluate``: the leader as ``net`` (what the release reports), each peer,
    and ``ensemble`` = the mean of the PEERS' logits (leader excluded, as the release). Each batch also
    goes into ``diversity`` (the release's ``dist``, over the peers)."""
    def outputs(images):
        z = model(images).logits
        diversity.add(z)
        return {"net": z[-1], **{f"peer{i}": z[i] for i in range(len(z) - 1)}, "ensemble": z[:-1].mean(0)}
    return outputs


# --------------------------------------------------------------------------- flags

def model_name(args):
    """The registry name of the model the flags describe, e.g. ``okddip:resnet32`` (models.okddip_name)."""
    return models.okddip_name("okddip-net" if args.network_based else "okddip", args.backbone, args.branches,
                              args.shared_dense_block)


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--backbone", default="resnet32", choices=BACKBONES,
                       help="the release's backbone (resnet110 and wrn_20_8 are its bottleneck variants)")
    p.network_argument("--branches", type=utils.number(int, 2), default=4, metavar="M",
                       help="m: m-1 auxiliary peers + 1 group leader")
    p.network_argument("--network-based", action="store_true",
                       help="m independent networks instead of branches on a shared trunk (the release's "
                            "--MulStu, facts Sec. 1.7)")
    p.network_argument("--shared-dense-block", action="store_true",
                       help="densenet40_12: every branch holds the SAME block 3, the release's bug (default: "
                            "one block per branch, as intended)")
    g = p.method_group("OKDDip")
    g.add_argument("--tau", type=utils.POSITIVE, default=3.0, help="temperature T of every KL term (T^2 inside)")
    g.add_argument("--alpha", type=utils.NON_NEGATIVE, default=1.0, help="weight of the distillation terms")
    g.add_argument("--ramp-length", type=utils.number(int, 0), default=80, metavar="EPOCHS",
                   help="L of the ramp w(e) = exp(-5 (1 - e/L)^2), e the 0-based epoch (0: w = 1 throughout)")
    g.add_argument("--detach-targets", action="store_true",
                   help="detach x_i and x_L (the attention's W_Q, W_K then never learn; default: live targets, "
                        "as the release)")
    utils.add_common_flags(p)
    p.set_defaults(recipe="okddip")
    args = utils.parse_args(p, argv)
    if args.shared_dense_block and (args.backbone != "densenet40_12" or args.network_based):
        p.error("--shared-dense-block applies to the branch-based densenet40_12 only")
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
        weight = consistency_weight(epoch - 1, args.ramp_length)  # once per epoch, 0-based (facts Sec. 0)
        for images, targets in run.train_batches():
            run.log(train_step(model, optimizer, images, targets, weight, args, run.precision))
        run.step_schedulers()
        diversity = DiversityMeter()
        metrics = run.evaluate(evaluation_outputs(model, diversity))
        metrics["peers_mean"] = utils.mean_metrics([metrics[f"peer{i}"] for i in range(args.branches - 1)])
        run.end_epoch(metrics, {"ramp_weight": weight, "diversity": diversity.value(utils.all_reduce_mean)})

    return run.finish({
        "backbone": args.backbone,
        "okddip": {"variant": "network-based" if args.network_based else "branch-based", "branches": args.branches,
                   "shared_dense_block": args.shared_dense_block, "tau": args.tau, "alpha": args.alpha,
                   "ramp_length": args.ramp_length, "detach_targets": args.detach_targets,
                   "reported": "net = the group leader (branch m-1), best epoch by its top-1"},
        "measured": {"best_epoch": run.best["net"]["epoch"],
                     **utils.history_summary(run.history, run.best["net"]["epoch"], ("diversity",))}})


if __name__ == "__main__":
    utils.main_guard(main)

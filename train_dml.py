"""DML: Deep Mutual Learning (Zhang et al., CVPR 2018), the online baseline of Tables 4, 6 and 7.

A cohort of two or more networks trains from scratch together; each network k learns
from the labels and from the predictions of its peers::

    L_k = CE(y, p_k^1) + 1/(K-1) sum_{l != k} tau^2 KL(p_l^tau || p_k^tau)

(Table 1 of the SwitOKD paper for K = 2; the cohort average of DML Sec. 3.2 for K > 2;
peers detached). Example::

    python train_dml.py --dataset digits --models resnet20 wrn_16_2 --epochs 15

Roles. The networks are named by their role, which picks their optimiser under
``--recipe official`` and names their files (``best_<role>.pt``) and metrics: with two
models the first is the ``student`` and the second the ``teacher`` (the SwitOKD pair);
with more, ``net1`` ... ``netK``. ``--roles`` names them explicitly.

Updates. By default every network is updated from the same forward pass (as SwitOKD's
learning mode, which the paper calls equivalent to DML). ``--sequential`` follows DML's
Algorithm 1: the networks are updated in turn, and after each update that network's
predictions on the mini-batch are recomputed, so the next network learns from them.

DML as the OKDDip release runs it (its ``train_DML.py``, docs/OKDDIP.md; R2.5), a
baseline of the OKDDip tables: four networks, T = 3, each distilling from the MEAN of the other
networks' logits, targets not detached, the release's KL (+1e-7 on the target)::

    python train_dml.py --recipe okddip --models resnet32 resnet32 resnet32 resnet32 \
        --tau 3 --peer-target mean-logits --live-targets --kl okddip

(``--peer-target pairwise --live-targets --kl okddip`` is the release's ``--type`` variant.) Every
run also records the cohort's mean top-1 per epoch and its best (``measured.cohort_mean``: what
the OKDDip release reports for DML, the best epoch chosen by that mean).
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import torch
import torch.nn.functional as F

from distill import kl_loss, okddip_kl

PEER_TARGETS = ("pairwise", "mean-logits")
KL_FORMS = ("hinton", "okddip")

# --------------------------------------------------------------------------- the method

def mutual_learning_loss(logits, peer_logits, targets, tau=1.0, peer_target="pairwise", detach=True, kl="hinton"):
    """L_k = CE(y, p_k^1) + mean over peers l of tau^2 KL(p_l^tau || p_k^tau) (DML Eqns. 4-5 and Sec. 3.2).

    ``peer_logits`` is a list of the other networks' logits. ``peer_target="mean-logits"``: one KL
    term, tau^2 KL(softmax(mean_l z_l / tau) || p_k^tau), the OKDDip release's DML (R2.5).
    ``detach=False`` lets the gradient flow into the peers (the OKDDip release); ``kl="okddip"`` is
    that release's KL, 1e-7 added to the target probabilities (``distill.okddip_kl``).
    Returns (total, CE, KL term).
    """
    def divergence(target):
        target = target.detach() if detach else target
        return kl_loss(target, logits, tau, detach=False) if kl == "hinton" else okddip_kl(target, logits, tau)
    ce = F.cross_entropy(logits, targets)
    if peer_target == "mean-logits":
        kl_term = divergence(torch.stack(peer_logits).mean(0))
    else:
        kl_term = torch.stack([divergence(peer) for peer in peer_logits]).mean()
    return ce + kl_term, ce, kl_term


def peers_of(k, logits):
    """Every entry of ``logits`` but the k-th."""
    return [z for j, z in enumerate(logits) if j != k]


def train_step(nets, optimizers, images, targets, tau, precision, sequential=False, peer_target="pairwise",
               detach=True, kl="hinton"):
    """One iteration of DML; returns each network's (CE, KL) as device tensors, by role.

    Simultaneous (default): every network is updated from the same forward pass, one backward
    through the summed losses. ``sequential``: DML's Algorithm 1, the networks updated in turn,
    each one's predictions recomputed after its update (a training-mode forward pass, which
    also moves its BatchNorm statistics once more). ``peer_target``, ``detach``, ``kl``: see
    :func:`mutual_learning_loss` (live targets only with the simultaneous update).
    """
    form = dict(peer_target=peer_target, detach=detach, kl=kl)
    roles = list(nets)
    with precision.autocast():
        logits = [nets[role](images).float() for role in roles]
    losses = {}
    if not sequential:
        losses = {role: mutual_learning_loss(z, peers_of(k, logits), targets, tau, **form)
                  for k, (role, z) in enumerate(zip(roles, logits))}
        for role in roles:
            optimizers[role].zero_grad(set_to_none=True)
        precision.backward(sum(total for total, _, _ in losses.values()))
        precision.step(*(optimizers[role] for role in roles))
    else:
        for k, role in enumerate(roles):
            losses[role] = mutual_learning_loss(logits[k], peers_of(k, logits), targets, tau, **form)
            optimizers[role].zero_grad(set_to_none=True)
            precision.backward(losses[role][0])
            precision.step(optimizers[role])
            if k + 1 < len(roles):
                with torch.no_grad(), precision.autocast():
                    logits[k] = nets[role](images).float()
    return {f"{role}/{name}": value for role, (_, ce, kl) in losses.items() for name, value in (("ce", ce), ("kl", kl))}


# --------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    utils.add_cohort_flags(p)
    g = p.method_group("DML")
    g.add_argument("--tau", type=utils.POSITIVE, default=1.0, help="temperature of the KL terms (DML has none: 1)")
    g.add_argument("--sequential", action="store_true",
                   help="DML Algorithm 1: update the networks in turn, refreshing predictions in between "
                        "(default: all from the same forward pass)")
    g.add_argument("--peer-target", default="pairwise", choices=PEER_TARGETS,
                   help="pairwise: the mean of one KL term per peer (DML); mean-logits: one KL term towards the "
                        "softened mean of the peers' logits (the OKDDip release's DML)")
    g.add_argument("--detach-targets", dest="detach_targets", action="store_true", default=True,
                   help="the peers' predictions are fixed targets (DML; the default)")
    g.add_argument("--live-targets", dest="detach_targets", action="store_false",
                   help="the gradient of each KL term also flows into the peers (the OKDDip release's DML)")
    g.add_argument("--kl", default="hinton", choices=KL_FORMS,
                   help="hinton: tau^2 KL; okddip: the OKDDip release's, 1e-7 added to the target probabilities")
    utils.add_common_flags(p)
    args = utils.parse_args(p, argv)
    if args.sequential and not args.detach_targets:
        p.error("--live-targets needs the simultaneous update (--sequential backpropagates one network at a time)")
    return args


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    networks = utils.cohort(args.models, args.roles)
    run = utils.Run(args, "dml", networks, script="three-networks" if len(networks) == 3 else None)

    for epoch in run.epochs():
        for images, targets in run.train_batches():
            run.log(train_step(run.nets, run.optimizers, images, targets, args.tau, run.precision, args.sequential,
                               args.peer_target, args.detach_targets, args.kl))
        run.step_schedulers()
        metrics = run.evaluate()
        run.end_epoch(metrics)

    return run.finish({"mutual_learning": {
        "tau": args.tau, "update": "sequential" if args.sequential else "simultaneous",
        "peers_per_network": len(networks) - 1, "peer_target": args.peer_target,
        "detach_targets": args.detach_targets, "kl": args.kl},
        "measured": {"cohort_mean": cohort_mean(run.history, networks)}})


def cohort_mean(history, roles):
    """The networks' mean top-1 per epoch, its best (the epoch chosen by it, ties to the earlier) and final value."""
    means = [sum(row[f"test/{role}/top1"] for role in roles) / len(roles) for row in history]
    best = max(range(len(means)), key=lambda i: (means[i], -i), default=None)
    return {"best_top1": None if best is None else means[best],
            "best_epoch": None if best is None else history[best]["epoch"],
            "final_top1": means[-1] if means else None, "per_epoch": means}


if __name__ == "__main__":
    utils.main_guard(main)

"""DML: Deep Mutual Learning (Zhang et al., CVPR 2018), the online baseline of Tables 4, 6 and 7.

A cohort of two or more networks trains from scratch together; each network k learns
from the labels and from the predictions of its peers::

    L_k = CE(y, p_k^1) + 1/(K-1) sum_{l != k} tau^2 KL(p_l^tau || p_k^tau)

(Table 1 of the SwitOKD paper for K = 2; the cohort average of DML Sec. 3.2 for K > 2;
peers detached). Example::

    python train_dml.py --dataset digits --models resnet20 wrn_16_2 --epochs 15

Roles. The networks are named by their role, which picks their optimiser under
``--recipe official`` and names their files (``best_<role>.pt``) and metrics: with two
models the first is the ``student`` and the second the ``teacher`` (the SwitOKD pair,
so the same recipe as ``train_switokd.py`` applies to each); with more, ``net1`` ...
``netK``. ``--roles`` names them explicitly (e.g. ``--roles student1 student2 teacher``
for Table 7, where only the role ``teacher`` gets the official teacher optimiser).

Updates. By default every network is updated from the same forward pass (as SwitOKD's
learning mode, which the paper calls equivalent to DML). ``--sequential`` follows DML's
Algorithm 1: the networks are updated in turn, and after each update that network's
predictions on the mini-batch are recomputed, so the next network learns from them.
"""
import re
import time

import torch
import torch.nn.functional as F

import utils
from train_switokd import distillation_loss

ROLE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


# --------------------------------------------------------------------------- the method

def mutual_learning_loss(logits, peer_logits, targets, tau=1.0):
    """L_k = CE(y, p_k^1) + mean over peers l of tau^2 KL(p_l^tau || p_k^tau) (DML Eqns. 4-5 and Sec. 3.2).

    ``peer_logits`` is a list of the other networks' logits (detached by
    ``distillation_loss``). Returns (total, CE term, mean KL term).
    """
    ce = F.cross_entropy(logits, targets)
    kl = torch.stack([distillation_loss(peer, logits, tau) for peer in peer_logits]).mean()
    return ce + kl, ce, kl


def peers_of(k, logits):
    """Every entry of ``logits`` but the k-th."""
    return [z for j, z in enumerate(logits) if j != k]


def simultaneous_update(run, roles, logits, targets, tau):
    """Update every network from the same forward pass (one backward through the summed losses)."""
    losses = [mutual_learning_loss(z, peers_of(k, logits), targets, tau) for k, z in enumerate(logits)]
    optimizers = [run.optimizers[role] for role in roles]
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    run.backward(sum(total for total, _, _ in losses))
    run.step(*optimizers)
    return losses


def sequential_update(run, roles, images, logits, targets, tau):
    """DML Algorithm 1: update the networks in turn, refreshing each one's predictions after its update.

    The refreshed predictions come from a forward pass in training mode, as in the
    algorithm (it also updates that network's BatchNorm running statistics once more).
    """
    logits = list(logits)
    losses = []
    for k, role in enumerate(roles):
        loss = mutual_learning_loss(logits[k], peers_of(k, logits), targets, tau)
        optimizer = run.optimizers[role]
        optimizer.zero_grad(set_to_none=True)
        run.backward(loss[0])
        run.step(optimizer)
        losses.append(loss)
        if k + 1 < len(roles):
            with torch.no_grad(), run.autocast():
                logits[k] = run.nets[role](images).float()
    return losses


# --------------------------------------------------------------------------- flags

def add_cohort_flags(p, default_models=("mobilenetv2_0.5", "wrn_16_2")):
    """``--models`` and ``--roles``, shared with train_kdcl.py."""
    p.add_argument("--models", nargs="+", default=list(default_models), metavar="MODEL",
                   help="two or more networks (python -m models lists them)")
    p.add_argument("--roles", nargs="+", metavar="ROLE",
                   help="one name per network; default: student teacher for two networks, "
                        "net1 .. netK otherwise")


def cohort(args) -> dict:
    """The networks as {role: model name}, checking ``--models`` and ``--roles``."""
    if len(args.models) < 2:
        raise utils.UsageError(f"--models needs two or more networks, got {len(args.models)}")
    roles = args.roles
    if roles is None:
        roles = ["student", "teacher"] if len(args.models) == 2 else \
            [f"net{k + 1}" for k in range(len(args.models))]
    if len(roles) != len(args.models):
        raise utils.UsageError(f"--roles names {len(roles)} networks but --models gives {len(args.models)}")
    for role in roles:
        if not ROLE_PATTERN.fullmatch(role):
            raise utils.UsageError(f"bad role name {role!r}; use letters, digits and _, "
                                   "starting with a letter")
    if len(set(roles)) != len(roles):
        raise utils.UsageError(f"--roles must be distinct, got {' '.join(roles)}")
    return dict(zip(roles, args.models))


def parse_args(argv=None):
    p = utils.common_parser(__doc__.splitlines()[0])
    add_cohort_flags(p)
    g = p.add_argument_group("DML")
    g.add_argument("--tau", type=utils.positive(float), default=1.0,
                   help="temperature of the KL terms (DML uses none, i.e. 1)")
    g.add_argument("--sequential", action="store_true",
                   help="DML Algorithm 1: update the networks in turn, refreshing predictions in between "
                        "(default: all from the same forward pass)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    networks = cohort(args)
    run = utils.Run(args, "dml", networks)
    roles = list(networks)
    nets = [run.nets[role] for role in roles]

    for _ in run.epochs():
        for images, targets in run.train_batches():
            start = time.perf_counter()
            with run.autocast():
                logits = [net(images).float() for net in nets]
            if args.sequential:
                losses = sequential_update(run, roles, images, logits, targets, args.tau)
            else:
                losses = simultaneous_update(run, roles, logits, targets, args.tau)
            run.synchronize()
            values = {}
            for role, (_, ce, kl) in zip(roles, losses):
                values.update({f"{role}_ce": ce, f"{role}_kl": kl})
            values["seconds"] = time.perf_counter() - start
            run.log_iteration(values)
        run.end_epoch()

    return run.finish({"mutual_learning": {
        "tau": args.tau, "update": "sequential" if args.sequential else "simultaneous",
        "peers_per_network": len(roles) - 1,
    }})


if __name__ == "__main__":
    utils.main_guard(main)

"""ONE, CL-ILR and individual branches, as the OKDDip release runs them (its ``train_one.py``).

One model of m = 4 equal branches on a shared trunk, trained by one of (docs/OKDDIP.md; R2.2-2.4)::

    one   (Lan et al., NeurIPS 2018):  sum_k CE(z_k, y) + CE(z_e, y) + alpha w(e) sum_k KL_T(z_e || z_k)
          z_e = sum_k g_k z_k, g = the gate's per-sample softmax over the branches
    clilr (Song & Chai, NeurIPS 2018): sum_k [ CE(z_k, y) + alpha w(e) KL_T(x_k || z_k) ]
          x_k = mean of the OTHER branches' logits; ILR: the trunk's gradient divided by m
    ind:                               sum_k CE(z_k, y)

with the release's KL (T = 3, T^2 inside, +1e-7 on the targets), the ramp w(e) = exp(-5 (1 - e/80)^2)
of the 0-based epoch e, and no target detached (``--detach-targets`` detaches them). The release's
``train_one.py`` = ``--method one``, ``--avg --bpscale`` = ``--method clilr``, ``--ind`` =
``--method ind``. Example::

    python train_one.py --dataset digits --method clilr --backbone resnet32 --epochs 15

Reported, as the release: the MEAN of the branches' top-1 (``net``: the mean of the branches'
top-1, top-5 and loss; ``best_net.pt`` holds the whole model at the epoch where that mean was best).
Also evaluated every epoch: each branch, the ensemble (mean of the branches' logits; for ONE also
the gated ensemble z_e) and the release's diversity ``dist``.
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import argparse

import torch
import torch.nn.functional as F

import models
from distill import DiversityMeter, consistency_weight, okddip_kl

METHODS = ("one", "clilr", "ind")


# --------------------------------------------------------------------------- the methods

def gated_ensemble(logits, gate):
    """ONE's teacher z_e = sum_k g_k z_k: the gate's weights (B, m) applied to the branches' LOGITS (m, B, C)."""
    return torch.einsum("bk,kbc->bc", gate, logits)


def one_loss(logits, gate, targets, weight, alpha=1.0, tau=3.0, detach=False):
    """ONE as the OKDDip release trains it (R2.2; ``train_one.py:110-113``)::

        sum_k CE(z_k, y) + CE(z_e, y) + alpha w sum_k KL_T(z_e || z_k)

    The gated ensemble has its own CE; its KL target is live by default (the gate and every branch
    also learn through the m KL terms); ``detach=True`` detaches it in the KL terms only (ONE's
    official code). Returns (total, CE sum with the ensemble's, KL sum).
    """
    z_e = gated_ensemble(logits, gate)
    target = z_e.detach() if detach else z_e
    ce = sum(F.cross_entropy(z, targets) for z in logits) + F.cross_entropy(z_e, targets)
    kl = sum(okddip_kl(target, z, tau) for z in logits)
    return ce + alpha * weight * kl, ce, kl


def peer_mean_targets(logits):
    """CL-ILR's targets x_k = (1/(m-1)) sum_{j != k} z_j, the other branches' mean LOGITS (R1.6).

    ``logits`` (m, B, C); returns (m, B, C)."""
    return torch.stack([torch.cat([logits[:k], logits[k + 1:]]).mean(0) for k in range(len(logits))])


def clilr_loss(logits, targets, weight, alpha=1.0, tau=3.0, detach=False):
    """CL(-ILR) as the OKDDip release trains it (R2.3; ``train_one.py:105-108``)::

        sum_k [ CE(z_k, y) + alpha w KL_T(x_k || z_k) ]

    CE weight 1, soft weight alpha w T^2 (no beta split), no ensemble CE. Live targets by default
    (each KL term also trains the other branches); ``detach=True`` detaches x_k. ILR is not here:
    it is the model's gradient rescaling at the split point (``ScaleGradient``, divisor m).
    Returns (total, CE sum, KL sum).
    """
    x = peer_mean_targets(logits)
    if detach:
        x = x.detach()
    ce = sum(F.cross_entropy(z, targets) for z in logits)
    kl = sum(okddip_kl(x_k, z_k, tau) for x_k, z_k in zip(x, logits))
    return ce + alpha * weight * kl, ce, kl


def ind_loss(logits, targets):
    """Individual branches (R2.4): sum_k CE(z_k, y), no distillation. Returns (total, CE sum)."""
    ce = sum(F.cross_entropy(z, targets) for z in logits)
    return ce, ce


def train_step(model, optimizer, images, targets, epoch, cfg, precision):
    """One iteration of ``cfg.method`` in (1-based) ``epoch``: one forward pass of the whole model, one
    backward, one step. The ramp w(e) takes the 0-based epoch, constant within it (docs/OKDDIP.md R0)."""
    weight = consistency_weight(epoch - 1, cfg.ramp_length)
    with precision.autocast():
        out = model(images)
    logits = out.logits.float()
    if cfg.method == "one":
        total, ce, kl = one_loss(logits, out.gate.float(), targets, weight, cfg.alpha, cfg.tau, cfg.detach_targets)
    elif cfg.method == "clilr":
        total, ce, kl = clilr_loss(logits, targets, weight, cfg.alpha, cfg.tau, cfg.detach_targets)
    else:
        (total, ce), kl = ind_loss(logits, targets), None
    optimizer.zero_grad(set_to_none=True)
    precision.backward(total)
    precision.step(optimizer)
    return {"loss": total, "ce": ce, **({} if kl is None else {"kl": kl})}


# --------------------------------------------------------------------------- evaluation

def evaluate(run, model, method):
    """Test metrics of each branch, ``ensemble`` = the mean of the branches' logits (what the release
    reports as the ensemble), for ONE ``gated`` = z_e, and the reported ``net`` = the MEAN of the
    branches' metrics; and the release's diversity ``dist``, from the same pass."""
    diversity = DiversityMeter()

    def outputs(images):
        out = model(images)
        z = out.logits
        diversity.add(z)
        named = {**{f"branch{k}": z[k] for k in range(len(z))}, "ensemble": z.mean(0)}
        if method == "one":
            named["gated"] = gated_ensemble(z.float(), out.gate.float())
        return named
    metrics = run.evaluate(outputs)
    mean = utils.mean_metrics([m for name, m in metrics.items() if name.startswith("branch")])
    return {"net": mean, **metrics}, diversity.value(utils.all_reduce_mean)


# --------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--method", default="one", choices=METHODS,
                       help="one: ONE's gated ensemble; clilr: CL-ILR, peers' mean targets (the release's --avg "
                            "--bpscale); ind: individual branches (the release's --ind)")
    g = utils.add_branch_flags(p, "ONE / CL-ILR", "m branches",
                               "detach the KL targets (ONE's z_e, CL-ILR's x_k), as ONE's official code does "
                               "(default: live targets, as the OKDDip release)")
    g.add_argument("--ilr", action=argparse.BooleanOptionalAction,
                   help="ILR, the trunk's gradient divided by m (the release's --bpscale) (default: on for clilr, "
                        "off otherwise; --no-ilr with clilr = CL, --ilr with one = the release's --bpscale alone)")
    args = utils.parse_branch_args(p, argv)
    if args.method == "ind" and (args.ilr or args.detach_targets):
        p.error("--method ind has no distillation: --ilr and --detach-targets do not apply")
    return args


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    run = utils.Run(args, "one", {"net": models.okddip_name(args.method, args.backbone, args.branches,
                                                             args.shared_dense_block)})
    model, optimizer = run.nets["net"], run.optimizers["net"]
    ilr = args.method == "clilr" if args.ilr is None else args.ilr
    run.modules["net"].ilr = ilr  # ScaleGradient(1/m) on the trunk output, before the branches and the gate

    for epoch in run.epochs():
        for images, targets in run.train_batches():
            run.log(train_step(model, optimizer, images, targets, epoch, args, run.precision))
        run.step_schedulers()
        metrics, diversity = evaluate(run, model, args.method)
        run.end_epoch(metrics, {"ramp_weight": consistency_weight(epoch - 1, args.ramp_length), "diversity": diversity})

    reported = "net = the mean of the branches' top-1 (and top-5, loss), best epoch by that mean"
    return run.finish({"backbone": args.backbone, "one": {**utils.branch_settings(args), "method": args.method,
                                                          "ilr": ilr, "reported": reported},
                       "measured": run.measured("net", ("diversity",))})


if __name__ == "__main__":
    utils.main_guard(main)

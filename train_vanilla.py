"""Vanilla: one network trained from scratch with cross-entropy alone.

The "Vanilla" columns of Tables 4-7 of the paper, and the pretrained teachers of the
offline methods (Table 5). Example::

    python train_vanilla.py --dataset digits --model resnet20 --epochs 15

``--keep-epochs`` / ``--keep-route`` keep the network's training route: a checkpoint
``route_epoch<k>.pt`` after each chosen epoch k (what ``best_<role>.pt`` holds, so
``models.load`` reads it; ``models.route_checkpoints`` lists them), the anchors of RCO
(``train_kd.py --distill rco``)::

    python train_vanilla.py --dataset digits --model wrn_16_2 --role teacher --epochs 15 --keep-route 4
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import torch.nn.functional as F

import models


def train_step(net, optimizer, images, targets, precision):
    """One iteration of L = CE(y, p^1); returns the loss (a device tensor, not copied to the host)."""
    with precision.autocast():
        logits = net(images)
    loss = F.cross_entropy(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step(optimizer)
    return {"loss": loss}


def route_epochs(epochs, keep_epochs=None, keep_route=None):
    """The epochs whose checkpoints are kept: ``keep_epochs`` as given, or ``keep_route`` = K
    equally spaced ones ending at the last epoch, floor(i E / K) for i = 1..K (those >= 1).

    K = 4 of 240 epochs: 60 120 180 240 (RCO's equal epoch interval strategy, Jin et al., 2019).
    An epoch beyond ``epochs`` raises UsageError.
    """
    if keep_route is not None:  # more checkpoints than epochs: every epoch (a smoke run of Table 5's script)
        return sorted({i * epochs // keep_route for i in range(1, keep_route + 1)} - {0})
    kept = sorted(set(keep_epochs or ()))
    beyond = [e for e in kept if e > epochs]
    if beyond:
        raise utils.UsageError(f"--keep-epochs {' '.join(map(str, beyond))} beyond the run's {epochs} epochs")
    return kept


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--model", default="wrn_16_2", help="the network")
    g = p.method_group("vanilla")
    g.add_argument("--role", default="student", choices=("student", "teacher"),
                   help="the recipe's optimiser for this role (they differ under --recipe official on CIFAR-100)")
    route = g.add_mutually_exclusive_group()
    route.add_argument("--keep-epochs", type=utils.POSITIVE_INT, nargs="+", metavar="EPOCH",
                       help="keep the network after these epochs as route_epoch<k>.pt (RCO's anchors)")
    route.add_argument("--keep-route", type=utils.POSITIVE_INT, metavar="K",
                       help="keep K checkpoints at equal epoch intervals, the last after the final epoch "
                            "(route_epoch<k>.pt; RCO's anchors); every epoch when the run has fewer than K")
    utils.add_common_flags(p)
    return utils.parse_args(p, argv)


def main(argv=None):
    args = parse_args(argv)
    run = utils.Run(args, "vanilla", {args.role: args.model})
    net, optimizer = run.nets[args.role], run.optimizers[args.role]
    # the route planned at the start, also when --epochs grows on resume (as the LR milestones)
    keep = run.state.setdefault("route_epochs", route_epochs(args.epochs, args.keep_epochs, args.keep_route))
    if args.keep_route and args.keep_route > len(keep):
        run.console.print(f"  note: --keep-route {args.keep_route} asks for more checkpoints than the run's "
                          f"{args.epochs} epochs; it keeps every epoch")

    for epoch in run.epochs():
        for images, targets in run.train_batches():
            run.log(train_step(net, optimizer, images, targets, run.precision))
        run.step_schedulers()
        metrics = run.evaluate()
        if epoch in keep and run.main:  # before end_epoch: a crash in between redoes (and rewrites) this epoch
            utils.save_torch(run.dir / models.ROUTE_FILE.format(epoch),
                             {**run.network_checkpoint(args.role, metrics[args.role]), "epoch": epoch})
        run.end_epoch(metrics)
    route = {"epochs": keep, "files": [models.ROUTE_FILE.format(e) for e in keep]}
    return run.finish({"route": route} if keep else None)


if __name__ == "__main__":
    utils.main_guard(main)

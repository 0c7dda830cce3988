"""Vanilla: one network trained from scratch with cross-entropy alone.

The "Vanilla" columns of Tables 4-7 of the paper, and the pretrained teachers of the
offline methods (Table 5). Example::

    python train_vanilla.py --dataset digits --model resnet20 --epochs 15
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import torch.nn.functional as F


def train_step(net, optimizer, images, targets, precision):
    """One iteration of L = CE(y, p^1); returns the loss (a device tensor, not copied to the host)."""
    with precision.autocast():
        logits = net(images)
    loss = F.cross_entropy(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step(optimizer)
    return {"loss": loss}


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--model", default="wrn_16_2", help="the network")
    g = p.method_group("vanilla")
    g.add_argument("--role", default="student", choices=("student", "teacher"),
                   help="the recipe's optimiser for this role (they differ under --recipe official on CIFAR-100)")
    utils.add_common_flags(p)
    return utils.parse_args(p, argv)


def main(argv=None):
    args = parse_args(argv)
    run = utils.Run(args, "vanilla", {args.role: args.model})
    net, optimizer = run.nets[args.role], run.optimizers[args.role]

    for epoch in run.epochs():
        for images, targets in run.train_batches():
            run.log(train_step(net, optimizer, images, targets, run.precision))
        run.step_schedulers()
        metrics = run.evaluate()
        run.end_epoch(metrics)
    return run.finish()


if __name__ == "__main__":
    utils.main_guard(main)

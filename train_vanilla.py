"""Vanilla: one network trained from scratch with cross-entropy alone.

The "Vanilla" column of Tables 4, 6 and 7 of the paper, and the pretrained teacher of
offline KD (Table 5). Example::

    python train_vanilla.py --dataset digits --model resnet20 --epochs 15
"""
import torch.nn.functional as F

import utils


def parse_args(argv=None):
    p = utils.common_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="wrn_16_2", help="network name (python -m models lists them)")
    p.add_argument("--role", default="student", choices=("student", "teacher"),
                   help="whose optimiser the recipe gives it (they differ only in --recipe official)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = utils.Run(args, "vanilla", {args.role: args.model})
    net, optimizer = run.nets[args.role], run.optimizers[args.role]
    for _ in run.epochs():
        for images, targets in run.train_batches():
            with run.autocast():
                logits = net(images)
            loss = F.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            run.backward(loss)
            run.step(optimizer)
            run.log_iteration({"loss": loss})
        run.end_epoch()
    return run.finish()


if __name__ == "__main__":
    utils.main_guard(main)

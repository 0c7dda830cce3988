"""KD: a student distilled from a fixed, pretrained teacher (Hinton et al., 2015).

The offline baseline of Table 5. The teacher is loaded from any checkpoint of this
repository and kept fixed (eval mode, no gradients, never stepped); the student
minimises Table 1's loss of the SwitOKD paper::

    L = alpha CE(y, p_s^1) + (1 - alpha) tau^2 KL(p_t^tau || p_s^tau)

so ``--alpha`` is the weight of the cross-entropy with the labels. Example (a teacher
trained by train_vanilla.py first)::

    python train_vanilla.py --dataset digits --model wrn_16_2 --role teacher --epochs 15 --out runs
    python train_kd.py --dataset digits --student resnet20 --teacher-ckpt runs/vanilla/digits-wrn_16_2-role=teacher-seed0

``--teacher-ckpt`` takes a run directory (its ``best_teacher.pt``, or its only
``best_<role>.pt``, ...: ``models.checkpoint_file``) or a checkpoint file.
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import torch
import torch.nn.functional as F

import models
from distill import kl_loss


# --------------------------------------------------------------------------- the method

def kd_loss(student_logits, teacher_logits, targets, alpha=0.1, tau=3.0):
    """L = alpha CE(y, p_s^1) + (1 - alpha) tau^2 KL(p_t^tau || p_s^tau): Table 1 (KD row).

    Returns (total, CE term, KL term before its weight).
    """
    ce = F.cross_entropy(student_logits, targets)
    kl = kl_loss(teacher_logits, student_logits, tau)
    return alpha * ce + (1 - alpha) * kl, ce, kl


def train_step(student, teacher, optimizer, images, targets, alpha, tau, precision):
    """One iteration of KD; returns the logged values (device tensors)."""
    with precision.autocast():
        z_s = student(images).float()
        with torch.no_grad():
            z_t = teacher(images).float()
    loss, ce, kl = kd_loss(z_s, z_t, targets, alpha, tau)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step(optimizer)
    return {"loss": loss, "ce": ce, "kl": kl}


def load_teacher(path, run):
    """The fixed teacher for ``run``'s data: built, loaded, on the device, eval mode, no gradients.

    A missing, corrupt or mismatching checkpoint (dataset, classes, image size) raises UsageError.
    """
    try:
        info = models.read_checkpoint(path)
        if info["dataset"] is not None and info["dataset"] != run.data.name:
            raise ValueError(f"{info['file']} was trained on {info['dataset']}, not {run.data.name}")
        teacher = models.load(path, num_classes=run.data.num_classes, image_size=run.data.image_size,
                              device=run.device)
    except ValueError as e:
        raise utils.UsageError(f"--teacher-ckpt: {e}") from None
    return teacher.to(memory_format=run.memory_format).requires_grad_(False)


# --------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--student", default="mobilenetv2_0.5", help="the student network")
    p.network_argument("--teacher-ckpt", required=True, metavar="PATH",
                       help="run directory or checkpoint file of the pretrained teacher")
    g = p.method_group("KD")
    g.add_argument("--alpha", type=utils.number(float, 0, 1), default=0.1,
                   help="weight of the cross-entropy with the labels; the KL term gets 1 - alpha (Table 1)")
    g.add_argument("--tau", type=utils.POSITIVE, default=3.0, help="distillation temperature")
    utils.add_common_flags(p)
    return utils.parse_args(p, argv)


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    run = utils.Run(args, "kd", {"student": args.student})
    teacher = load_teacher(args.teacher_ckpt, run)
    teacher_info = {**teacher.checkpoint, "params": models.count_parameters(teacher),
                    **{f"test_{k}": v for k, v in utils.evaluate(teacher, run.test_loader,
                                                                 run.precision.autocast).items()}}
    run.console.print(f"  teacher    {teacher_info['arch']} from {teacher_info['file']}: "
                      f"{teacher_info['test_top1']:.2f}% test top-1")
    student, optimizer = run.nets["student"], run.optimizers["student"]

    for epoch in run.epochs():
        for images, targets in run.train_batches():
            run.log(train_step(student, teacher, optimizer, images, targets, args.alpha, args.tau, run.precision))
        run.step_schedulers()
        metrics = run.evaluate()
        run.end_epoch(metrics)

    return run.finish({"kd": {"alpha": args.alpha, "tau": args.tau}, "teacher": teacher_info})


if __name__ == "__main__":
    utils.main_guard(main)

"""KD: a student distilled from a fixed, pretrained teacher (Hinton et al., 2015).

The offline baseline of Table 5. The teacher is loaded from any checkpoint of this
repository and kept fixed (eval mode, no gradients, never stepped); the student
minimises Table 1's loss of the SwitOKD paper::

    L = alpha CE(y, p_s^1) + (1 - alpha) tau^2 KL(p_t^tau || p_s^tau)

so ``--alpha`` is the weight of the cross-entropy with the labels. Example (a teacher
trained by train_vanilla.py first)::

    python train_vanilla.py --dataset digits --model wrn_16_2 --role teacher --epochs 15 --out runs
    python train_kd.py --dataset digits --student resnet20 --teacher-ckpt runs/vanilla/digits-wrn_16_2-seed0

``--teacher-ckpt`` takes a run directory (its ``best_teacher.pt``; else its only
``best_<role>.pt``; else, of several, the network with the highest best accuracy in its
``results.json``; else its ``last.pt``) or a file: ``best_<role>.pt`` or ``last.pt``
(its ``teacher`` network, or its only one).
"""
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import models
import utils
from train_switokd import distillation_loss


# --------------------------------------------------------------------------- the method

def kd_loss(student_logits, teacher_logits, targets, alpha=0.1, tau=3.0):
    """L = alpha CE(y, p_s^1) + (1 - alpha) tau^2 KL(p_t^tau || p_s^tau): Table 1 (KD row).

    Returns (total, CE term, KL term before its weight).
    """
    ce = F.cross_entropy(student_logits, targets)
    kl = distillation_loss(teacher_logits, student_logits, tau)
    return alpha * ce + (1 - alpha) * kl, ce, kl


# --------------------------------------------------------------------------- the teacher

def teacher_file(path: Path) -> Path:
    """The checkpoint file that ``--teacher-ckpt PATH`` designates (see the module docstring)."""
    if not path.is_dir():
        return path
    if (path / "best_teacher.pt").is_file():
        return path / "best_teacher.pt"
    bests = sorted(path.glob("best_*.pt"))
    if len(bests) == 1:
        return bests[0]
    if bests and (path / "results.json").is_file():
        try:
            networks = json.loads((path / "results.json").read_text())["networks"]
            role = max((r for r in networks if (path / f"best_{r}.pt").is_file()),
                       key=lambda r: networks[r]["best_top1"])
        except (ValueError, KeyError, TypeError):
            raise utils.UsageError(f"cannot read {path / 'results.json'}; pass one of "
                                   f"{', '.join(b.name for b in bests)} as --teacher-ckpt") from None
        return path / f"best_{role}.pt"
    if not bests and (path / "last.pt").is_file():
        return path / "last.pt"
    raise utils.UsageError(f"no teacher checkpoint in {path}: expected best_teacher.pt, one best_<role>.pt, "
                           "results.json or last.pt")


def teacher_weights(ckpt: dict, file: Path):
    """(architecture, state dict, num_classes or None, image_size or None) of a repository checkpoint."""
    if isinstance(ckpt, dict) and {"arch", "model"} <= ckpt.keys():
        return ckpt["arch"], ckpt["model"], ckpt.get("num_classes"), ckpt.get("image_size")
    if isinstance(ckpt, dict) and {"models", "networks"} <= ckpt.keys():
        roles = list(ckpt["networks"])
        role = "teacher" if "teacher" in roles else roles[0] if len(roles) == 1 else None
        if role is None:
            raise utils.UsageError(f"{file} holds several networks ({', '.join(roles)}) and none is "
                                   "'teacher'; pass its best_<role>.pt instead")
        return ckpt["networks"][role], ckpt["models"][role], None, None
    raise utils.UsageError(f"{file} is not a checkpoint of this repository "
                           "(no arch/model or models/networks keys)")


def load_teacher(path, data, device, memory_format=torch.contiguous_format):
    """The fixed teacher: built with ``models.build`` for ``data``, weights loaded, eval mode, no gradients.

    Returns (module, info). A missing, corrupt or mismatching checkpoint raises UsageError.
    """
    file = teacher_file(Path(path))
    arch, state, num_classes, image_size = teacher_weights(utils.load_checkpoint(file), file)
    if num_classes is not None and num_classes != data.num_classes:
        raise utils.UsageError(f"teacher checkpoint {file} is a {arch} for {num_classes} classes, "
                               f"but {data.name} has {data.num_classes}")
    if image_size is not None and image_size != data.image_size:
        raise utils.UsageError(f"teacher checkpoint {file} is a {arch} for {image_size}px images, "
                               f"but {data.name} has {data.image_size}px")
    try:
        with torch.random.fork_rng(devices=[]):  # building must not move the training RNG (exact resume)
            teacher = models.build(arch, data.num_classes, image_size=data.image_size)
        teacher.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise utils.UsageError(f"teacher checkpoint {file} ({arch}) does not fit {data.name} with "
                               f"{data.num_classes} classes: {str(e).splitlines()[0]}") from None
    teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    return teacher, {"arch": arch, "checkpoint": str(file), "params": models.count_parameters(teacher)}


# --------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = utils.common_parser(__doc__.splitlines()[0])
    p.add_argument("--student", default="mobilenetv2_0.5", help="student network (python -m models)")
    p.add_argument("--teacher-ckpt", required=True, metavar="PATH",
                   help="run directory or checkpoint file of the pretrained teacher")
    g = p.add_argument_group("KD")
    g.add_argument("--alpha", type=float, default=0.1,
                   help="weight of the cross-entropy with the labels; the KL term gets 1 - alpha (Table 1)")
    g.add_argument("--tau", type=utils.positive(float), default=3.0, help="distillation temperature")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        raise utils.UsageError(f"--alpha {args.alpha} must lie in [0, 1]")
    run = utils.Run(args, "kd", {"student": args.student})
    teacher, teacher_info = load_teacher(args.teacher_ckpt, run.data, run.device, run.memory_format)
    metrics = utils.evaluate(teacher, run.test_loader, run.autocast)
    teacher_info.update({f"test_{k}": v for k, v in metrics.items()})
    if run.main:
        print(f"teacher {teacher_info['arch']} from {teacher_info['checkpoint']}: "
              f"{metrics['top1']:.2f}% test top-1", flush=True)
    student, optimizer = run.nets["student"], run.optimizers["student"]

    for _ in run.epochs():
        for images, targets in run.train_batches():
            start = time.perf_counter()
            with run.autocast():
                z_s = student(images).float()
                with torch.no_grad():
                    z_t = teacher(images).float()
            loss, ce, kl = kd_loss(z_s, z_t, targets, args.alpha, args.tau)
            optimizer.zero_grad(set_to_none=True)
            run.backward(loss)
            run.step(optimizer)
            run.synchronize()
            run.log_iteration({"loss": loss, "ce": ce, "kl": kl, "seconds": time.perf_counter() - start})
        run.end_epoch()

    return run.finish({"kd": {"alpha": args.alpha, "tau": args.tau}, "teacher": teacher_info})


if __name__ == "__main__":
    utils.main_guard(main)

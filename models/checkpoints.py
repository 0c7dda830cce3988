"""Networks saved by the training scripts, read back anywhere: :func:`load`, :func:`read_checkpoint`.

A run directory holds ``best_<role>.pt`` (one network: ``arch``, ``variant``,
``num_classes``, ``image_size``, ``dataset``, ``model`` = its state dict, ...) and
``last.pt`` (every network of the run, with optimisers, for resuming). Either, or the
run directory itself, designates a network::

    net = models.load("checkpoints/switokd/cifar100-mobilenetv2_0.5-wrn_16_2-seed0", role="student")
    logits = net(images)          # eval mode, on the CPU unless device= says otherwise

A run of ``train_vanilla.py --keep-epochs/--keep-route`` also keeps its network's training
route, ``route_epoch<k>.pt`` after epoch k (the format of ``best_<role>.pt``; RCO's anchors):
:data:`ROUTE_FILE`, :func:`route_checkpoints`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

ROUTE_FILE = "route_epoch{}.pt"
"""The name of the route checkpoint kept after an epoch (``ROUTE_FILE.format(epoch)``)."""
_ROUTE_PATTERN = re.compile(r"route_epoch([0-9]+)\.pt")


def checkpoint_file(path, role: str | None = None) -> Path:
    """The file a path designates: a file itself, or in a run directory ``best_<role>.pt``.

    Without ``role`` a run directory gives its only ``best_<role>.pt``, else ``best_teacher.pt``,
    else the network with the highest best accuracy in its ``results.json``, else ``last.pt``.
    """
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise ValueError(f"no checkpoint at {path}")
        return path
    if role is not None:
        if (path / f"best_{role}.pt").is_file():
            return path / f"best_{role}.pt"
        if (path / "last.pt").is_file():
            return path / "last.pt"
        raise ValueError(f"no best_{role}.pt or last.pt in {path}")
    bests = sorted(path.glob("best_*.pt"))
    if len(bests) == 1:
        return bests[0]
    if (path / "best_teacher.pt").is_file():
        return path / "best_teacher.pt"
    if bests and (path / "results.json").is_file():
        try:
            networks = json.loads((path / "results.json").read_text())["networks"]
            best = max((r for r in networks if (path / f"best_{r}.pt").is_file()),
                       key=lambda r: networks[r]["best_top1"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"cannot read {path / 'results.json'}; name the network: "
                             f"{', '.join(b.name for b in bests)}") from None
        return path / f"best_{best}.pt"
    if not bests and (path / "last.pt").is_file():
        return path / "last.pt"
    raise ValueError(f"no checkpoint in {path}: expected best_<role>.pt, results.json or last.pt")


def route_checkpoints(path) -> dict[int, Path]:
    """The training route a run directory keeps: ``{epoch: route_epoch<epoch>.pt}``, by epoch (maybe empty).

    A path that is not a directory raises ValueError.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a run directory")
    found = {int(m[1]): f for f in path.iterdir() if (m := _ROUTE_PATTERN.fullmatch(f.name)) and f.is_file()}
    return dict(sorted(found.items()))


def read_checkpoint(path, role: str | None = None) -> dict:
    """One network's description and weights: ``arch``, ``variant``, ``num_classes``, ``image_size``,
    ``dataset``, ``state_dict``, ``role``, ``file`` (some None when a ``last.pt`` does not record them)."""
    file = checkpoint_file(path, role)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise ValueError(f"cannot read checkpoint {file} ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and {"arch", "model"} <= ckpt.keys():
        if role is not None and ckpt.get("role", role) != role:
            raise ValueError(f"{file} holds the {ckpt['role']}, not the {role}")
        return {"arch": ckpt["arch"], "variant": ckpt.get("variant", "paper"), "num_classes": ckpt.get("num_classes"),
                "image_size": ckpt.get("image_size"), "dataset": ckpt.get("dataset"), "state_dict": ckpt["model"],
                "role": ckpt.get("role", role), "epoch": ckpt.get("epoch"), "file": str(file)}
    if isinstance(ckpt, dict) and {"models", "networks"} <= ckpt.keys():
        roles = list(ckpt["networks"])
        if role is None:
            role = "teacher" if "teacher" in roles else roles[0] if len(roles) == 1 else None
        if role not in roles:
            raise ValueError(f"{file} holds {', '.join(roles)}; name one of them")
        identity = ckpt.get("identity", {})
        return {"arch": ckpt["networks"][role], "variant": identity.get("arch_variant", "paper"),
                "num_classes": None, "image_size": None, "dataset": identity.get("dataset"),
                "state_dict": ckpt["models"][role], "role": role, "epoch": ckpt.get("epoch"), "file": str(file)}
    raise ValueError(f"{file} is not a checkpoint of this repository")


def load(path, role: str | None = None, num_classes: int | None = None, image_size: int | None = None,
         device="cpu") -> nn.Module:
    """The network a checkpoint holds, built with :func:`models.build`, weights loaded, in eval mode.

    ``num_classes`` and ``image_size`` are needed only for a ``last.pt``, which does not record
    them (``best_<role>.pt`` does); given for a file that records them, they must agree.
    """
    from . import build
    info = read_checkpoint(path, role)
    for key, given in (("num_classes", num_classes), ("image_size", image_size)):
        if given is not None and info[key] is not None and given != info[key]:
            raise ValueError(f"{info['file']} is a {info['arch']} for {key} {info[key]}, not {given}")
        info[key] = info[key] or given
    if info["num_classes"] is None or info["image_size"] is None:
        raise ValueError(f"{info['file']} does not record the class count and image size; pass them")
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
        model = build(info["arch"], info["num_classes"], info["image_size"], info["variant"])
    try:
        model.load_state_dict(info["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{info['file']} ({info['arch']}) does not fit: {str(e).splitlines()[0]}") from None
    model.checkpoint = {k: v for k, v in info.items() if k != "state_dict"}
    return model.to(device).eval()

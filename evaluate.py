"""Evaluate saved networks: top-1, top-5 and loss on a dataset's test split or an image folder.

    python evaluate.py checkpoints/switokd/cifar100-mobilenetv2_0.5-wrn_16_2-seed0
    python evaluate.py RUN_DIR --weights last --json
    python evaluate.py RUN_DIR/best_student.pt other_run/best_teacher.pt      # and their ensemble
    python evaluate.py RUN_DIR --image-folder my_images/                     # <class>/<image> folders

A run directory stands for every network it trained (its ``best_<role>.pt``, or with
``--weights last`` the networks of ``last.pt``), evaluated on the data it was tested on
(dataset and test subset from its ``results.json``/``args.json``), so the numbers
reproduce the ones recorded there. With several networks the ensemble (mean of their
logits) is evaluated too; a multi-branch network (OKDDip, ONE, CL-ILR) gives every branch
and what its script reports (OKDDip: the leader; the others: the mean of the branches).
In Python: ``models.load(path)`` gives one network, ready to use.
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import json
import sys
from pathlib import Path

import torch

import datasets
import models


def networks_of(path: Path, weights: str) -> list[tuple[str, Path, str | None]]:
    """(name, checkpoint file, role) of every network ``path`` designates."""
    if not path.is_dir():
        return [(path.stem.removeprefix("best_"), path, None)]
    if weights == "last":
        ckpt = utils.load_checkpoint(path / "last.pt")
        return [(role, path / "last.pt", role) for role in ckpt.get("networks", {})]
    found = sorted(path.glob("best_*.pt"))
    if not found:
        raise utils.UsageError(f"no best_<role>.pt in {path}; pass --weights last or a checkpoint file")
    return [(f.stem.removeprefix("best_"), f, f.stem.removeprefix("best_")) for f in found]


def reported_metric(arch: str, branches: dict) -> dict:
    """A multi-branch network's metric as the OKDDip release reports it: OKDDip's leader (the last
    branch); ONE, CL-ILR, individual branches: the mean of the branches' metrics."""
    if arch.startswith("okddip"):
        return branches[list(branches)[-1]]
    return utils.mean_metrics(list(branches.values()))


def recorded_args(path: Path) -> dict:
    """The flags a run directory (or the one holding a checkpoint file) was trained with: its
    results.json, else its args.json; {} when it has neither. A file that exists but cannot be
    read is an error: evaluating on other data than the run's would go unnoticed."""
    run_dir = path if path.is_dir() else path.parent
    for name in ("results.json", "args.json"):
        file = run_dir / name
        if not file.exists():
            continue
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise utils.UsageError(f"cannot read {file} ({type(e).__name__}): it says on which data the run was "
                                   "tested; repair it, or pass --dataset and --test-subset") from None
        if not isinstance(record, dict):
            raise utils.UsageError(f"{file} is not a run record (a JSON object)")
        return record.get("args", record) if name == "results.json" else record
    return {}


def unique_names(entries: list[tuple[Path, str, Path, str | None]]) -> list[str]:
    """A name per network: its role, prefixed by its run directory when several paths are given
    (``runA:student``), numbered when that is still ambiguous."""
    several = len({path for path, *_ in entries}) > 1
    names = []
    for path, name, file, _ in entries:
        label = f"{(path if path.is_dir() else file.parent).name}:{name}" if several else name
        names.append(label if label not in names else f"{label}#{names.count(label) + 1}")
    return names


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0], usage="%(prog)s PATH [PATH ...] [options]")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run directories or checkpoint files")
    p.add_argument("--weights", default="best", choices=("best", "last"),
                   help="for a run directory: best_<role>.pt (the best epoch) or last.pt (the last epoch)")
    p.add_argument("--dataset", choices=datasets.NAMES, help="default: the one the networks were trained on")
    p.add_argument("--data-root", help="default: the run's, else ./data (or DATA_ROOT)")
    p.add_argument("--test-subset", type=utils.POSITIVE_INT, metavar="N",
                   help="a fixed class-balanced subset (default: the run's, else the whole test split)")
    p.add_argument("--image-folder", type=Path, metavar="DIR",
                   help="evaluate on DIR/<class>/<image> instead (classes in sorted order, as the dataset's)")
    p.add_argument("--batch-size", type=utils.POSITIVE_INT, default=200, help="evaluation batch")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--amp", nargs="?", const="bf16", choices=("bf16", "fp16"), help="autocast (bare --amp: bf16)")
    p.add_argument("--workers", type=utils.number(int, 0), default=utils.DEFAULT_WORKERS,
                   help="DataLoader worker processes (disk-backed datasets and image folders)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    found = [(path, name, file, role) for path in args.paths for name, file, role in networks_of(path, args.weights)]
    if not found:
        raise utils.UsageError("no networks found in " + ", ".join(map(str, args.paths)))
    entries = [(name, file, role, recorded_args(path)) for name, (path, _, file, role)
               in zip(unique_names(found), found)]
    infos = []
    for name, file, role, _ in entries:
        try:
            infos.append(models.read_checkpoint(file, role))
        except ValueError as e:
            raise utils.UsageError(str(e)) from None
    recorded = entries[0][3]
    own = infos[0]["dataset"] or recorded.get("dataset")
    dataset = args.dataset or own
    if dataset is None:
        raise utils.UsageError("the checkpoint does not say its dataset; pass --dataset")
    others = sorted({info["dataset"] or r.get("dataset") for info, (*_, r) in zip(infos, entries)} - {dataset, None})
    if others:
        print(f"evaluate.py: warning: evaluating on {dataset} networks trained on {', '.join(others)}",
              file=sys.stderr, flush=True)
    root = args.data_root or recorded.get("data_root") or "./data"
    subset = args.test_subset or (recorded.get("test_subset") if not args.dataset or args.dataset == dataset else None)
    device = utils.choose_device(args.device)
    try:
        data = datasets.build(dataset, root, test_subset=None if args.image_folder else subset)
        nets = {name: models.load(file, role, data.num_classes, data.image_size, device)
                for name, file, role, _ in entries}
    except ValueError as e:
        raise utils.UsageError(str(e)) from None
    if args.image_folder:
        try:
            test = datasets.image_folder(args.image_folder, data)
        except ValueError as e:
            raise utils.UsageError(str(e)) from None
        loader = datasets.loaders.TorchLoader(test, args.batch_size, train=False, device=device,
                                              workers=args.workers, seed=0, rank=0, world_size=1, drop_last=False)
    else:
        test = data.test
        loader = datasets.make_loaders(data, args.batch_size, args.batch_size, device=device, workers=args.workers,
                                       loader="torch" if data.test_arrays is None else "tensor").test
    precision = utils.Precision(device, args.amp)

    def outputs(images):
        logits = {}
        for name, net in nets.items():
            out = net(images)
            if isinstance(out, models.BranchOutput):  # OKDDip, ONE, CL-ILR: every branch, then as reported
                logits.update({f"{name}/branch{k}": z.float() for k, z in enumerate(out.logits)})
            else:
                logits[name] = out.float()
        if len(nets) > 1:
            logits["ensemble"] = torch.stack([z for n, z in logits.items() if n in nets]).mean(0)
        return logits
    metrics = utils.evaluate_outputs(outputs, list(nets.values()), loader, precision.autocast)
    for (name, info) in zip(nets, infos):
        if name not in metrics:  # a multi-branch network: what its training script reports
            metrics[name] = reported_metric(info["arch"], {k: v for k, v in metrics.items() if k.startswith(f"{name}/")})
    report = {"dataset": dataset, "split": str(args.image_folder) if args.image_folder else "test",
              "images": len(test), "networks": {name: {**metrics[name], "arch": info["arch"], "file": info["file"]}
                                                for name, info in zip(nets, infos)}}
    if "ensemble" in metrics:
        report["ensemble"] = {**metrics["ensemble"], "members": list(nets)}
    branches = {name: m for name, m in metrics.items() if "/" in name}
    if branches:
        report["branches"] = branches
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"{dataset} {report['split']}: {report['images']} images")
    rows = {**report["networks"], **branches, **({"ensemble": report["ensemble"]} if "ensemble" in report else {})}
    width = max(14, *map(len, rows))
    print(f"{'network':<{width}} {'arch':<22} {'top-1':>8} {'top-5':>8} {'loss':>8}")
    for name, m in rows.items():
        arch = m.get("arch", "mean of logits" if name == "ensemble" else "one branch")
        print(f"{name:<{width}} {arch:<22} {m['top1']:>7.2f}% {m['top5']:>7.2f}% {m['loss']:>8.4f}")
    return report


if __name__ == "__main__":
    utils.main_guard(main)

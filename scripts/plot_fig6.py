"""Fig. 6 of the paper: where teacher and student look (Grad-CAM), and how much their maps agree.

    python scripts/plot_fig6.py runs/table6/switokd/imagenet-resnet18-resnet34-seed0 \\
        runs/table6/dml/imagenet-resnet18-resnet34-seed0 runs/table6/kdcl/imagenet-resnet18-resnet34-seed0 \\
        --vanilla runs/table6/vanilla/imagenet-resnet18-seed0 runs/table6/vanilla/imagenet-resnet34-seed0 \\
        --images 100 --show 3 --output fig6.png

Each RUN is a teacher-student pair (``best_teacher.pt`` and ``best_student.pt``: SwitOKD
first, then DML, KDCL, ... for contrast); ``--vanilla`` adds the two networks trained
alone. For N test images (``--images`` drawn with ``--image-seed``, or ``--index``) it
computes Grad-CAM (Selvaraju et al.; the paper's [21]) of the true class at the last
convolutional stage of every network (:func:`last_conv_stage`), with captum's
``LayerGradCam`` (ReLU of the channel-weighted activations, upsampled bilinearly to the
image, divided by its maximum). The figure shows ``--show`` of the images, one row per
image and method: the image, (a) the teacher's and the student's map over it (red = high)
and (b) the two maps as 3D surfaces (x, y = image width and height, z = the map), as the
paper's Fig. 6. Per image and method it scores the agreement of the two maps, "the more
the peaks overlap, the better the student mimics the teacher": the Pearson correlation r
of the maps and the IoU of their hot regions (above half of each map's maximum); the
means over the N images, per method, go to the JSON file (``--json``, default: the PNG's
name with .json) and the figure's title. A map that is zero everywhere (no positive
evidence for the true class) has no correlation: it counts as missing (null) there.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402  (first of the repository: quiet Ctrl-C during the slow imports)
import datasets  # noqa: E402
import models  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from plotting import save_figure  # noqa: E402

LABELS = {"switokd": "SwitOKD", "dml": "DML", "kdcl": "KDCL", "kd": "KD", "vanilla": "Vanilla"}
ROLES = ("teacher", "student")
HOT = 0.5  # the hot region of a map: at least half its maximum


# --------------------------------------------------------------------------- Grad-CAM

def last_conv_stage(model: nn.Module, image_size: int) -> tuple[str, nn.Module]:
    """(name, module) of the network's last convolutional stage, found by a probe forward.

    It is the module whose output is the last 4-D activation (N, C, H, W) with more than
    one spatial position, in the order the modules finish: the feature map that global
    pooling turns into the classifier's input. Containers finish after their children,
    so the outermost module ending there is chosen (``layer4`` of a torchvision ResNet,
    the final BN-ReLU of a WRN, the last 1x1 conv block of a MobileNet).
    """
    finished: list[tuple[str, nn.Module, tuple]] = []

    def record(name):
        def hook(module, inputs, output):
            if torch.is_tensor(output):
                finished.append((name, module, tuple(output.shape)))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if m is not model]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    spatial = [(name, module) for name, module, shape in finished if len(shape) == 4 and shape[2] * shape[3] > 1]
    if not spatial:
        raise utils.UsageError(f"{type(model).__name__} has no 4-D activation larger than 1x1 at {image_size} px")
    return spatial[-1]


def grad_cam(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: torch.Tensor,
             batch: int = 32) -> np.ndarray:
    """Grad-CAM maps (N, H, W) of ``targets`` at ``layer``, upsampled to the images, each in [0, 1]."""
    from captum.attr import LayerAttribution, LayerGradCam
    cam = LayerGradCam(model, layer)
    maps = []
    with torch.enable_grad():
        for start in range(0, len(images), batch):
            x, y = images[start:start + batch], targets[start:start + batch]
            attribution = cam.attribute(x, target=y, relu_attributions=True).detach()
            maps.append(LayerAttribution.interpolate(attribution, tuple(x.shape[-2:]), "bilinear")[:, 0])
    maps = torch.cat(maps).clamp_min(0).float().cpu().numpy()
    peak = maps.reshape(len(maps), -1).max(axis=1)
    return maps / np.where(peak > 0, peak, 1)[:, None, None]


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two maps; None when one of them is constant (e.g. zero everywhere)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else None


def iou(a: np.ndarray, b: np.ndarray) -> float | None:
    """IoU of the hot regions (>= HOT of the maximum) of two maps in [0, 1]; None when both are empty."""
    hot_a, hot_b = (a >= HOT) & (a > 0), (b >= HOT) & (b > 0)
    union = (hot_a | hot_b).sum()
    return float((hot_a & hot_b).sum() / union) if union else None


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------- inputs

def method_of(run_dir: Path) -> str:
    """The label of a run directory: its results.json's method, else its parent folder's name."""
    try:
        method = json.loads((run_dir / "results.json").read_text())["method"]
    except (OSError, ValueError, KeyError, TypeError):
        method = run_dir.parent.name
    return LABELS.get(method, method)


def recorded(run_dir: Path, key: str):
    """A flag a run was trained with (its args.json), or None."""
    try:
        return json.loads((run_dir / "args.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def load_pairs(runs: list[Path], vanilla: list[Path] | None, device) -> dict[str, dict]:
    """{label: {"teacher": network, "student": network}}; each network (eval mode) has ``.checkpoint``
    (models.load) and ``.run_dir``. Every network must be of one dataset."""
    sources = [(method_of(run), {role: (run, role) for role in ROLES}) for run in runs]
    if vanilla:
        sources.append(("Vanilla", {"student": (vanilla[0], None), "teacher": (vanilla[1], None)}))
    pairs = {}
    for label, where in sources:
        while label in pairs:  # two runs of one method: label them apart
            label += "'"
        pair = {}
        for role, (path, wanted) in where.items():
            if not path.is_dir():
                raise utils.UsageError(f"no run directory {path}")
            try:
                pair[role] = models.load(path, role=wanted, device=device)
            except ValueError as e:
                raise utils.UsageError(str(e)) from None
            pair[role].run_dir = path
        pairs[label] = pair
    nets = [net for pair in pairs.values() for net in pair.values()]
    first = nets[0].checkpoint
    for net in nets[1:]:
        for key in ("dataset", "num_classes", "image_size"):
            if net.checkpoint[key] != first[key]:
                raise utils.UsageError(f"{net.checkpoint['file']} is for {key} {net.checkpoint[key]}, "
                                       f"{first['file']} for {first[key]}: compare networks of one dataset")
    return pairs


def choose_images(data, count: int, seed: int, index: list[int] | None) -> list[int]:
    """Indices into the test split: ``index`` as given, else ``count`` drawn without replacement with ``seed``."""
    size = len(data.test)
    if index:
        bad = [i for i in index if not 0 <= i < size]
        if bad:
            raise utils.UsageError(f"--index {bad[0]} is outside the test split (0 .. {size - 1})")
        return list(index)
    if count > size:
        raise utils.UsageError(f"--images {count} is more than the {size} test images")
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist()


# --------------------------------------------------------------------------- the figure

def pretty(arch: str) -> str:
    """'resnet34' -> 'ResNet-34', 'wrn_16_2' -> 'WRN-16-2', 'mobilenetv2_0.5' -> '0.5MobileNetV2'."""
    if arch.startswith("resnet"):
        return f"ResNet-{arch[6:]}"
    if arch.startswith("wrn_"):
        return "WRN-" + arch[4:].replace("_", "-")
    if arch.startswith("mobilenetv2"):
        return f"{arch.partition('_')[2]}MobileNetV2"
    return arch.replace("mobilenet", "MobileNet")


def surface(ax, heat: np.ndarray, title: str) -> None:
    """The map as a 3D surface (at most 56 x 56 points), z from 0 to 1, like Fig. 6(b)."""
    step = max(1, int(np.ceil(max(heat.shape) / 56)))
    z = heat[::step, ::step]
    y, x = np.mgrid[0:heat.shape[0]:step, 0:heat.shape[1]:step]
    ax.plot_surface(x, y, z, cmap="jet", vmin=0, vmax=1, linewidth=0, antialiased=False)
    ax.set(zlim=(0, 1), xlim=(0, heat.shape[1]), ylim=(heat.shape[0], 0))
    ax.set_title(title, fontsize=9, pad=0)
    ax.set_xlabel("x", fontsize=7, labelpad=-6)
    ax.set_ylabel("y", fontsize=7, labelpad=-6)
    ax.tick_params(labelsize=6, pad=0)
    ax.view_init(elev=35, azim=-60)


def draw(report: dict, pictures: np.ndarray, maps: dict, show: int, output: Path) -> Path:
    """One row per shown image and method: the image, (a) the two overlays, (b) the two surfaces."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    rows = [(i, m) for i in range(min(show, len(pictures))) for m in methods]
    missing = any(v is None for e in report["methods"].values() for v in e["correlation"] + e["iou"])
    top = 1.3 + 0.2 * missing  # inches above the first row: title and column headers
    fig = plt.figure(figsize=(14, 2.7 * len(rows) + top))
    headers = ["image", "(a) teacher: heat map", "(a) student: heat map",
               "(b) teacher: 3D surface", "(b) student: 3D surface"]
    for r, (i, method) in enumerate(rows):
        entry = report["methods"][method]
        index, label = report["images"][i], report["labels"][i]
        axes = [fig.add_subplot(len(rows), 5, 5 * r + 1 + c, **({"projection": "3d"} if c >= 3 else {}))
                for c in range(5)]
        axes[0].imshow(pictures[i])
        axes[0].set_ylabel(f"{method}\nimage {index}, class {label}", fontsize=9)
        axes[0].set_xlabel(f"T-S agreement: r = {fmt(entry['correlation'][i])}, IoU = {fmt(entry['iou'][i])}",
                           fontsize=9)
        for c, role in enumerate(ROLES):
            net, heat, short = entry[role], maps[method][role][i], role[0].upper()
            verdict = "correct" if net["predicted"][i] == label else f"predicts {net['predicted'][i]}"
            axes[1 + c].imshow(pictures[i])
            axes[1 + c].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[1 + c].set_title(f"{short}: {pretty(net['arch'])} ({verdict})", fontsize=9)
            surface(axes[3 + c], heat, f"{short}: {pretty(net['arch'])}")
        for ax in axes[:3]:
            ax.set_xticks([])
            ax.set_yticks([])
        if r == 0:
            for ax, header in zip(axes, headers):
                write = getattr(ax, "text2D", ax.text)  # 3D axes place 2D text with text2D
                write(0.5, 1.2, header, transform=ax.transAxes, ha="center", fontsize=10, weight="bold")
    means = ", ".join(f"{m} {fmt(e['mean_correlation'])} / {fmt(e['mean_iou'])}"
                      for m, e in report["methods"].items())
    first = report["methods"][methods[0]]
    n = len(report["images"])
    fig.suptitle(f"Grad-CAM of the true class at the last convolutional stage, {report['dataset']} test images; "
                 f"T: {pretty(first['teacher']['arch'])}, S: {pretty(first['student']['arch'])}\n"
                 f"teacher-student agreement, mean r / IoU over {n} image{'s' * (n != 1)}: {means}"
                 + ("\n(n/a: a map is zero everywhere, no positive evidence for the class)" if missing else ""),
                 fontsize=11, y=1 - 0.2 / fig.get_figheight())
    fig.subplots_adjust(left=0.05, right=0.98, top=1 - top / fig.get_figheight(), bottom=0.02, hspace=0.45,
                        wspace=0.12)
    return save_figure(fig, output)


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="run directories of teacher-student pairs (best_teacher.pt, best_student.pt): SwitOKD "
                        "first, then the methods to compare (DML, KDCL, ...)")
    p.add_argument("--vanilla", nargs=2, type=Path, metavar=("STUDENT_RUN", "TEACHER_RUN"),
                   help="also the two networks trained alone (train_vanilla.py run directories)")
    p.add_argument("--images", type=utils.POSITIVE_INT, default=8, metavar="N",
                   help="test images to score, drawn at random with --image-seed")
    p.add_argument("--image-seed", type=utils.number(int, 0), default=0, help="seed of the drawing of the images")
    p.add_argument("--index", type=utils.number(int, 0), nargs="+", metavar="I",
                   help="these test images instead (indices into the test split)")
    p.add_argument("--show", type=utils.POSITIVE_INT, default=3, metavar="K",
                   help="images drawn in the figure (the first K of those scored)")
    p.add_argument("--data-root", help="dataset folder (default: the first run's, else DATA_ROOT or ./data)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--output", type=Path, default=Path("fig6.png"), help="the PNG file")
    p.add_argument("--json", type=Path, help="the scores (default: the PNG's path with .json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = utils.choose_device(args.device)
    pairs = load_pairs(args.runs, args.vanilla, device)
    info = next(iter(pairs.values()))["teacher"].checkpoint
    root = args.data_root or recorded(args.runs[0], "data_root") or os.environ.get("DATA_ROOT", "./data")
    data = datasets.build(info["dataset"], root)
    chosen = choose_images(data, args.images, args.image_seed, args.index)
    images = torch.stack([data.test[i][0] for i in chosen]).to(device)
    labels = torch.tensor([data.test[i][1] for i in chosen], device=device)
    mean_, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    pictures = (images.cpu() * std + mean_).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    report = {"dataset": info["dataset"], "images": chosen, "labels": labels.tolist(), "image_seed":
              None if args.index else args.image_seed,
              "score": f"per method, over the images: mean Pearson correlation r of the teacher's and the "
                       f"student's Grad-CAM maps, and mean IoU of their regions >= {HOT} of the maximum",
              "methods": {}}
    maps = {}  # the maps of the images shown
    for label, pair in pairs.items():
        entry, cams = {}, {}
        for role in ROLES:
            net = pair[role]
            name, layer = last_conv_stage(net, data.image_size)
            cams[role] = grad_cam(net, layer, images, labels)
            with torch.no_grad():
                predicted = net(images).argmax(1).tolist()
            entry[role] = {"arch": net.checkpoint["arch"], "layer": name, "run": str(net.run_dir),
                           "checkpoint": net.checkpoint["file"], "predicted": predicted}
        maps[label] = {role: cams[role][:args.show] for role in ROLES}
        pairs_of_maps = list(zip(cams["teacher"], cams["student"]))
        entry["correlation"] = [correlation(t, s) for t, s in pairs_of_maps]
        entry["iou"] = [iou(t, s) for t, s in pairs_of_maps]
        entry["mean_correlation"], entry["mean_iou"] = mean(entry["correlation"]), mean(entry["iou"])
        entry["scored"] = sum(v is not None for v in entry["correlation"])
        report["methods"][label] = entry
        print(f"{label}: r = {fmt(entry['mean_correlation'])}, IoU = {fmt(entry['mean_iou'])} over {len(chosen)} "
              f"images (Grad-CAM at teacher.{entry['teacher']['layer']}, student.{entry['student']['layer']})")
    png = draw(report, pictures, maps, args.show, args.output)
    json_path = args.json or args.output.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(png)
    print(json_path)
    return 0


if __name__ == "__main__":
    sys.exit(utils.main_guard(main))

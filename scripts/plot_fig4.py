"""Fig. 4 of the paper from one SwitOKD run directory (and optionally a KDCL run to compare).

    python scripts/plot_fig4.py runs/fig4/switokd/cifar100-resnet32-wrn_16_2-seed0 \\
        --compare runs/fig4/kdcl/cifar100-resnet32-wrn_16_2-seed0 --output fig4.png

Panels: (a) test accuracy of student and teacher per epoch, the gap between them shaded;
(b) their test loss; (c) the student's CE and KL training losses (epoch means); (d) the
L1 norms of Eqn. (1) and Table 1, G = ||p_s - p_t||_1 and ||p_s - y||_1, and the switching
threshold delta of Eqn. (13), per iteration (moving average), over the colour bar of the
switching: cyan = learning mode, magenta = expert mode (one stripe per iteration). A KDCL run
given with --compare is drawn dashed in (a)-(c). A run with ``--r-form ratio`` gives Fig.
4(e), the paper's default 4(f).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from plotting import iteration_positions, moving_average, read_metrics, read_trace, save_figure

CYAN, MAGENTA = "#00bcd4", "#e91e63"


def series(rows, key):
    """(epochs, values) of ``key`` where the rows have it."""
    points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    return (np.array([p[0] for p in points]), np.array([p[1] for p in points])) if points else (None, None)


def label_of(run_dir: Path) -> str:
    try:
        results = json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError):
        return run_dir.name
    return results.get("run_name") or run_dir.name


def plot(run_dir: Path, compare: Path | None, output: Path) -> Path:
    rows, trace = read_metrics(run_dir), read_trace(run_dir)
    other = read_metrics(compare) if compare else None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    args = json.loads((run_dir / "args.json").read_text()) if (run_dir / "args.json").is_file() else {}
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.08], hspace=0.45, wspace=0.22)
    ax_acc, ax_loss = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_kl, ax_l1 = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    ax_bar = fig.add_subplot(grid[2, :], sharex=ax_l1)
    colours = {"student": "tab:blue", "teacher": "tab:red"}

    for source, style, name in ((rows, "-", "SwitOKD"), (other, "--", "KDCL")):
        if source is None:
            continue
        if len(source) <= 30:  # few epochs: mark the points
            style += "o"
        for role, colour in colours.items():
            x, acc = series(source, f"test/{role}/top1")
            if x is not None:
                ax_acc.plot(x, acc, style, color=colour, markersize=3, label=f"{name} {role} ({acc.max():.2f}%)")
            x, loss = series(source, f"test/{role}/loss")
            if x is not None:
                ax_loss.plot(x, loss, style, color=colour, markersize=3, label=f"{name} {role}")
        for key, colour in (("ce", "tab:green"), ("kl", "tab:purple")):
            x, value = series(source, f"train/student_{key}")    # SwitOKD's trace names
            if x is None:
                x, value = series(source, f"train/student/{key}")  # the cohort methods' (KDCL, DML)
            if x is not None:
                ax_kl.plot(x, value, style, color=colour, markersize=3, label=f"{name} student {key.upper()}")
    x, student = series(rows, "test/student/top1")
    _, teacher = series(rows, "test/teacher/top1")
    if x is not None and teacher is not None and len(teacher) == len(student):
        ax_acc.fill_between(x, student, teacher, color="0.85", label="SwitOKD accuracy gap")

    positions = iteration_positions(trace["epoch"])
    window = max(1, len(positions) // 200)
    for key, colour, style, label in (("G", "tab:purple", "-", "G = ||p_s - p_t||_1 (KL gradient)"),
                                      ("ps_y", "tab:green", "-", "||p_s - y||_1 (CE gradient)"),
                                      ("delta", "black", "--", "delta, Eqn. (13) (switching threshold)")):
        ax_l1.plot(positions, trace[key], color=colour, alpha=0.15, linewidth=0.5)
        ax_l1.plot(positions, moving_average(trace[key], window), style, color=colour, label=label)
    expert = trace["expert"].astype(float)[None, :]
    left = positions[0] - (positions[1] - positions[0] if len(positions) > 1 else 1.0)
    ax_bar.imshow(expert, aspect="auto", cmap=ListedColormap([CYAN, MAGENTA]), vmin=0, vmax=1,
                  extent=(left, positions[-1], 0, 1), interpolation="nearest")
    ax_bar.set_yticks([])
    fraction = float(trace["expert"].mean())
    ax_bar.set_xlabel(f"epoch    colour bar: cyan = learning mode, magenta = expert mode "
                      f"({100 * fraction:.1f}% of {len(positions)} iterations in expert mode)")

    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss, ax_kl, ax_l1):  # every panel on the same epoch axis, from 0
        ax.set_xlim(0, max(r["epoch"] for r in rows))
    titles = {ax_acc: ("(a) test accuracy", "top-1 (%)"), ax_loss: ("(b) test loss", "cross-entropy (log scale)"),
              ax_kl: ("(c) student training losses (epoch means)", "loss"),
              ax_l1: ("(d) L1 norms of the gradients and delta (per iteration, moving average)", "L1 norm")}
    for ax, (title, ylabel) in titles.items():
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    r_form = {"ratio": "r = d_t / d_s (Fig. 4e)", "sum": "r = d_t / (d_s + d_t) (Fig. 4f)"}.get(args.get("r_form"), "")
    fig.suptitle(f"{label_of(run_dir)}: student {args.get('student', '?')}, teacher {args.get('teacher', '?')}, "
                 f"{args.get('dataset', '?')}   {r_form}")
    return save_figure(fig, output)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a train_switokd.py run directory")
    p.add_argument("--compare", type=Path, help="a KDCL (or any other) run directory drawn dashed in (a)-(c)")
    p.add_argument("--output", type=Path, help="PNG file (default: RUN_DIR/fig4.png)")
    args = p.parse_args(argv)
    output = plot(args.run_dir, args.compare, args.output or args.run_dir / "fig4.png")
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

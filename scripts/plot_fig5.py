"""Figs. 1 (left) and 5 of the paper: the student's accuracy against the teacher's capacity.

    python scripts/plot_fig5.py runs --output fig5.png

One panel per experiment (default ``fig1``, CIFAR-100, and ``fig5``, CIFAR-10, as
written by scripts/fig1_fig5_capacity.sh): for KD, DML, KDCL and SwitOKD, the student's
best test accuracy (mean over seeds, error bar = sample std) against the teacher, the
teachers ordered by parameter count; the Vanilla student is the dashed line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from plotting import save_figure
from summarize import mean_std, read_runs

METHODS = {"kd": ("KD", "tab:gray"), "dml": ("DML", "tab:blue"), "kdcl": ("KDCL", "tab:orange"),
           "switokd": ("SwitOKD", "tab:green")}


def student_and_teacher(run):
    """(student arch, student best top-1, teacher arch, teacher parameters) of a two-network run."""
    networks = run.results.get("networks", {})
    student = networks.get("student")
    teacher = run.results.get("teacher") if run.facets.get("method") == "kd" else networks.get("teacher")
    if not student or not isinstance(teacher, dict):
        return None
    return student["arch"], student["best_top1"], teacher.get("arch"), teacher.get("params") or 0


def capacity_curves(runs):
    """{method: {teacher arch: [student accuracies]}}, {teacher: params}, {student arch: vanilla accuracies}."""
    curves, params, vanilla = {}, {}, {}
    for run in runs:
        method = run.facets.get("method")
        if method == "vanilla":
            for info in run.results.get("networks", {}).values():
                vanilla.setdefault(info["arch"], []).append(info["best_top1"])
        elif method in METHODS and (found := student_and_teacher(run)):
            student, accuracy, teacher, count = found
            curves.setdefault(method, {}).setdefault((student, teacher), []).append(accuracy)
            params[teacher] = count
    return curves, params, vanilla


def plot(root: Path, experiments: list[str], output: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, _, _ = read_runs(root)
    panels = [(e, [r for r in runs if r.experiment == e]) for e in experiments]
    panels = [(e, rs) for e, rs in panels if any(r.facets.get("method") in METHODS for r in rs)]
    if not panels:
        raise SystemExit(f"plot_fig5.py: error: no finished KD/DML/KDCL/SwitOKD runs of {', '.join(experiments)} "
                         f"below {root}")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (experiment, members) in zip(axes[0], panels):
        curves, params, vanilla = capacity_curves(members)
        teachers = sorted(params, key=lambda t: params[t])
        students = sorted({s for method in curves.values() for s, _ in method})
        x = np.arange(len(teachers))
        for method, (label, colour) in METHODS.items():
            for student in students:
                points = [(i, *mean_std(curves.get(method, {}).get((student, t), [])))
                          for i, t in enumerate(teachers)]
                points = [(i, m, s or 0.0) for i, m, s, n in points if n]
                if points:
                    i, m, s = map(np.array, zip(*points))
                    name = label if len(students) == 1 else f"{label} ({student})"
                    ax.errorbar(i, m, yerr=s, marker="o", capsize=3, color=colour, label=name)
        for student in students:
            mean, _, n = mean_std(vanilla.get(student, []))
            if n:
                ax.axhline(mean, linestyle="--", color="black", linewidth=1, label=f"Vanilla {student} ({mean:.2f}%)")
        dataset = members[0].results.get("dataset", "?")
        ax.set_xticks(x, [f"{t}\n{params[t] / 1e6:.2f}M" for t in teachers])
        ax.set_xlabel("teacher (parameters)")
        ax.set_ylabel(f"student {'/'.join(students)} best top-1 (%)")
        ax.set_title(f"{experiment}: {dataset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Student accuracy against teacher capacity (mean ± std over seeds)")
    fig.tight_layout()
    return save_figure(fig, output)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder holding the experiments' run directories (e.g. runs)")
    p.add_argument("--experiments", nargs="+", default=["fig1", "fig5"], help="experiment folders, one panel each")
    p.add_argument("--output", type=Path, help="PNG file (default: ROOT/fig5.png)")
    args = p.parse_args(argv)
    print(plot(args.root, args.experiments, args.output or args.root / "fig5.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

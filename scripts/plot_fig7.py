"""Fig. 7 of the paper: time per iteration and cumulative training time of SwitOKD, DML and KDCL.

    python scripts/plot_fig7.py runs/fig7 --output fig7.png

Reads the finished SwitOKD, DML and KDCL runs below the folder (scripts/fig7_time.sh;
the lowest seed of each method). Every curve is the same quantity, the *step time*: the
body of the training loop as the engine times it for every script alike
(``Run.train_batches``: forward passes, losses, backward, optimiser steps and logging;
data loading and evaluation excluded). SwitOKD records it per iteration in switching.npz;
DML and KDCL in TensorBoard (``iter/seconds``, steps counted from 1, every
``--log-interval`` iterations); where no per-iteration record is complete, the epoch's
mean (``time/train_s`` / ``time/iterations`` of metrics.jsonl). The legend says which; the
text gives SwitOKD's total step time as "x% less than DML", as Sec. 3.7 does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from plotting import hours_text, iteration_positions, moving_average, read_metrics, save_figure
from summarize import read_runs

METHODS = {"switokd": ("SwitOKD", "tab:green"), "dml": ("DML", "tab:blue"), "kdcl": ("KDCL", "tab:orange")}


def tensorboard_seconds(run_dir: Path):
    """(iteration steps, seconds) logged as ``iter/seconds``; None if TensorBoard has none."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    if not (run_dir / "tensorboard").is_dir():
        return None
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    if "iter/seconds" not in accumulator.Tags().get("scalars", []):
        return None
    events = accumulator.Scalars("iter/seconds")
    return np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float)


def iteration_times(run) -> dict:
    """The run's step time per iteration (x in epochs) and its cumulative step time in hours: per
    iteration where a complete record exists (switching.npz, else TensorBoard's ``iter/seconds``),
    else per epoch (``time/train_s`` / ``time/iterations`` of metrics.jsonl). The same quantity
    either way: the loop body the engine times, no data loading, no evaluation."""
    rows = read_metrics(run.path) if (run.path / "metrics.jsonl").is_file() else []
    epochs = len(rows)
    npz = run.path / "switching.npz"
    if npz.is_file():
        with np.load(npz) as z:
            x, seconds = iteration_positions(z["epoch"]), z["seconds"].astype(float)
        return {"x": x, "seconds": seconds, "cum_x": x, "cum_h": np.cumsum(seconds) / 3600,
                "note": "per iteration (switching.npz)"}
    logged = tensorboard_seconds(run.path)
    if logged is not None and epochs:
        steps, seconds = logged
        iterations = int(steps.max())  # TensorBoard's steps count iterations from 1
        if sorted(steps.tolist()) == list(range(1, iterations + 1)):  # every iteration recorded
            order = np.argsort(steps)
            x = steps[order] / (iterations / epochs)  # the last iteration of epoch e at x = e
            return {"x": x, "seconds": seconds[order], "cum_x": x, "cum_h": np.cumsum(seconds[order]) / 3600,
                    "note": "per iteration (TensorBoard)"}
    x = np.array([r["epoch"] for r in rows], dtype=float)
    train = np.array([r.get("time/train_s", np.nan) for r in rows], dtype=float)
    seconds = train / np.array([max(r.get("time/iterations", 1), 1) for r in rows], dtype=float)
    return {"x": x, "seconds": seconds, "cum_x": x, "cum_h": np.cumsum(train) / 3600,
            "note": "epoch means (metrics.jsonl)"}


def savings(totals: dict) -> list[str]:
    """SwitOKD's total step time against DML's and KDCL's, as Sec. 3.7 puts it."""
    if "switokd" not in totals:
        return []
    return [compared(totals["switokd"], totals[m], METHODS[m][0]) for m in ("dml", "kdcl") if totals.get(m)]


def compared(ours: float, theirs: float, name: str) -> str:
    """'27.3% less than DML' or '13.1% more than DML' (the paper's way of putting Sec. 3.7)."""
    change = 100 * (1 - ours / theirs)
    return f"{abs(change):.1f}% {'less' if change >= 0 else 'more'} than {name}"


def plot(root: Path, output: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, _, _ = read_runs(root)
    chosen = {}
    for run in sorted(runs, key=lambda r: r.results.get("seed", 0)):
        chosen.setdefault(run.facets.get("method"), run)
    chosen = {m: chosen[m] for m in METHODS if m in chosen}
    if not chosen:
        raise SystemExit(f"plot_fig7.py: error: no finished SwitOKD, DML or KDCL run below {root}")
    fig, (ax_it, ax_cum) = plt.subplots(1, 2, figsize=(13, 4.8))
    totals = {}
    for method, run in chosen.items():
        label, colour = METHODS[method]
        t = iteration_times(run)
        window = max(1, len(t["seconds"]) // 200)
        ax_it.plot(t["x"], t["seconds"], color=colour, alpha=0.2, linewidth=0.5)
        ax_it.plot(t["x"], moving_average(t["seconds"], window), color=colour, label=f"{label}: {t['note']}")
        totals[method] = float(t["cum_h"][-1])
        wall = run.results.get("wall_time_s", 0) / 3600
        ax_cum.plot(t["cum_x"], t["cum_h"], color=colour,
                    label=f"{label}: {hours_text(totals[method])} of training steps ({hours_text(wall)} wall)")
    ax_it.set(title="step time per iteration (moving average over the faint raw values)", xlabel="epoch",
              ylabel="seconds")
    ax_cum.set(title="cumulative step time", xlabel="epoch", ylabel="hours")
    saved = savings(totals)
    if saved:
        ax_cum.text(0.02, 0.97, "SwitOKD's step time: " + ", ".join(saved) + "\n(paper: 27.3% and 34.8% less)",
                    transform=ax_cum.transAxes, va="top", fontsize=9)
    for ax in (ax_it, ax_cum):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_cum else "upper right")
    first = next(iter(chosen.values()))
    networks = first.results.get("networks", {})
    fig.suptitle(f"{first.results.get('dataset', '?')}: student {networks.get('student', {}).get('arch', '?')}, "
                 f"teacher {networks.get('teacher', {}).get('arch', '?')}; step time = forward + backward + "
                 f"update (no data loading, no evaluation)")
    fig.tight_layout()
    return save_figure(fig, output)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder holding the runs (e.g. runs/fig7)")
    p.add_argument("--output", type=Path, help="PNG file (default: ROOT/fig7.png)")
    args = p.parse_args(argv)
    print(plot(args.root, args.output or args.root / "fig7.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

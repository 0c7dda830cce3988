"""What the figure scripts share: reading a run's records, the x axis of iterations, saving a PNG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch rows of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{Path(__import__('sys').argv[0]).name}: error: no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_trace(run_dir: Path) -> dict:
    """A SwitOKD run's switching.npz (one entry per iteration)."""
    path = run_dir / "switching.npz"
    if not path.is_file():
        raise SystemExit(f"{Path(__import__('sys').argv[0]).name}: error: no switching.npz in {run_dir} "
                         "(is it a train_switokd.py run?)")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def iteration_positions(epoch_of_iteration: np.ndarray) -> np.ndarray:
    """x in epochs for every iteration: iteration i of n in epoch e sits at e - 1 + (i + 1) / n,
    so the last iteration of epoch e is at x = e, where the epoch's test accuracy is plotted."""
    x = np.empty(len(epoch_of_iteration), dtype=float)
    for epoch in np.unique(epoch_of_iteration):
        where = np.flatnonzero(epoch_of_iteration == epoch)
        x[where] = epoch - 1 + np.arange(1, len(where) + 1) / len(where)
    return x


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def hours_text(hours: float) -> str:
    """A duration for a legend: hours when long, minutes or seconds when short."""
    seconds = hours * 3600
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{hours:.2f} h"


def save_figure(fig, output: Path) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return output

"""The paper's tables from finished runs, beside the published numbers; and every run as a table.

    python scripts/summarize.py runs                  # the paper's tables (Markdown)
    python scripts/summarize.py runs --csv            # the same, one CSV row per cell
    python scripts/summarize.py runs --runs           # one row per run and network
    python scripts/summarize.py runs --runs --csv > runs.csv   # ... with every flag: pandas.read_csv

Reads every ``results.json`` below RUN_ROOT. A run directory is
``<RUN_ROOT>/.../<experiment>/<method>/<run-name>/`` (what the scripts/*.sh write):
the experiment (``table2`` ... ``table7``, ``fig1``, ``fig4``, ``fig5``, ``fig7``) is the
folder above the method's; a run directly at ``<RUN_ROOT>/<method>/<run-name>/`` (a
hand-made run) belongs to no experiment. Runs are grouped by experiment, method, run name
without its ``-seed<k>`` suffix, dataset, networks and method settings; a group's seeds
are averaged.

Each table of scripts/published.json is printed in the paper's layout, with the rows
that have runs (``--all``: every row); a cell holds the runs of its experiment whose
results.json matches the cell (see the file's ``_about``): best and final top-1 (%), each
as mean ± sample standard deviation (ddof = 1; "–" for a single run) over seeds, the
number of runs, and the published value with our best mean minus it (the paper reports
the best test accuracy over training). A table with ``"metric": "error"`` shows top-1 error
(100 - top-1; "best" is then the lowest error); a row or column with ``"value": {"best": PATH,
"final": PATH}`` reads its two numbers from those dotted paths of results.json instead of a
network's accuracy (e.g. a cohort's mean accuracy, an ensemble's). Groups that no cell claims are listed after their
experiment's table, one row per network. A run is finished when its results.json says so
(``status``); other runs (unfinished, interrupted, only last.pt, or killed in their first
epoch: only args.json) are listed as in progress; a results.json that cannot be read is
skipped with a warning; a diverged run (its status, or an accuracy that is not finite) is
excluded from every mean and listed with where it diverged.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

PUBLISHED = Path(__file__).with_name("published.json")
SEED_SUFFIX = re.compile(r"-seed\d+$")
DASH = "–"
LEGEND = ("cell: best ± std / final ± std (n = runs) · paper value (our best mean − paper); "
          "top-1 %, std = sample std (ddof 1) over seeds, – for n < 2")


# --------------------------------------------------------------------------- reading runs

@dataclass
class RunRecord:
    """One finished run: its results.json and where it lies."""

    path: Path
    experiment: str
    results: dict
    facets: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return SEED_SUFFIX.sub("", self.path.name)

    def accuracy(self, network=None, role=None):
        """(best, final) top-1 of the network named ``network`` (or playing ``role``); None if absent."""
        for r, info in self.results.get("networks", {}).items():
            if (network is not None and info.get("arch") == network) or (network is None and r == role):
                return info.get("best_top1"), info.get("final_top1")
        return None


def flatten(obj, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def facets(results: dict) -> dict:
    """What a cell can match: every field of results.json (not args, networks, provenance) and ``archs``."""
    out = flatten({k: v for k, v in results.items() if k not in ("args", "networks", "provenance", "invocations")})
    archs = [info["arch"] for info in results.get("networks", {}).values()]
    if isinstance(results.get("teacher"), dict) and "teacher" not in results.get("networks", {}):
        archs.append(results["teacher"].get("arch"))  # the fixed, pretrained teacher of train_kd.py's methods
    out["archs"] = sorted(a for a in archs if a)
    return out


def signature(run: RunRecord) -> str:
    """Everything that must agree for runs to be averaged together (all but the seed)."""
    settings = {k: v for k, v in run.facets.items()
                if k not in ("seed", "wall_time_s", "epochs", "iterations", "teacher.file", "teacher.epoch", "status",
                             "rco.anchors", "crd.z")
                and not k.startswith(("expert_fraction", "paused_fraction", "seconds_per_iteration",
                                      "kdcl.general_weights", "teacher.test_", "provenance", "invocations",
                                      "settings.device", "settings.threads", "measured."))}
    networks = {role: info.get("arch") for role, info in run.results.get("networks", {}).items()}
    return json.dumps([networks, settings], sort_keys=True, default=str)


def progress(run_dir: Path) -> str:
    """'epoch k of N' from metrics.jsonl and args.json, as far as they say."""
    done = 0
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            try:
                done = json.loads(rows[-1]).get("epoch", len(rows))
            except (ValueError, AttributeError):
                done = len(rows)
    planned = None
    try:
        planned = json.loads((run_dir / "args.json").read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        status = json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    text = f"epoch {done} of {planned}" if planned else f"epoch {done} (of the recipe's epochs)"
    return f"{text} ({status})" if status in ("interrupted", "stopped", "failed") else text


def valid_results(results) -> str | None:
    """Why a parsed results.json cannot be summarised, or None when it can."""
    if not isinstance(results, dict):
        return f"a {type(results).__name__}, not an object"
    networks = results.get("networks")
    if not isinstance(networks, dict) or not networks:
        return "no networks"
    for role, info in networks.items():
        if not isinstance(info, dict) or not isinstance(info.get("arch"), str):
            return f"network {role!r} has no arch"
        for key in ("best_top1", "final_top1"):
            if info.get(key) is not None and not isinstance(info[key], (int, float)):
                return f"network {role!r} has a non-numeric {key}"
    return None


def is_finished(results: dict) -> bool:
    """Finished when results.json says so (older files: when every planned epoch ran)."""
    if "status" in results:
        return results["status"] == "finished"
    return isinstance(results.get("epochs"), int) and results.get("epochs") == results.get("epochs_planned")


def diverged(results: dict) -> bool:
    """Its results.json says it diverged, or an accuracy is not finite."""
    return results.get("status") == "diverged" or any(
        isinstance(v, float) and not math.isfinite(v) for info in results["networks"].values()
        for v in (info.get("best_top1"), info.get("final_top1")))


def experiment_of(root: Path, run_dir: Path) -> str:
    """The folder above the method's, if it lies below ``root``; '' for ``root/<method>/<run>``."""
    parts = run_dir.relative_to(root).parts
    return parts[-3] if len(parts) >= 3 else ""


def read_runs(root: Path):
    """(finished runs, in-progress run directories, excluded (run directory, reason)) below ``root``."""
    finished, unfinished, excluded = [], [], []
    run_dirs = {p.parent for name in ("results.json", "last.pt", "args.json") for p in root.rglob(name)}
    for run_dir in sorted(run_dirs):
        if not (run_dir / "results.json").is_file():
            unfinished.append(run_dir)  # interrupted, or killed in its first epoch (args.json only)
            continue
        try:
            results = json.loads((run_dir / "results.json").read_text())
        except (OSError, ValueError) as e:
            results, problem = None, f"unreadable ({type(e).__name__})"
        else:
            problem = valid_results(results)
        if problem:
            print(f"summarize.py: warning: skipping {run_dir / 'results.json'}: {problem}", file=sys.stderr)
            continue
        if diverged(results):
            excluded.append((run_dir, f"diverged: {results.get('ended') or 'non-finite accuracy'}"))
        elif not is_finished(results):
            unfinished.append(run_dir)
        else:
            finished.append(RunRecord(run_dir, experiment_of(root, run_dir), results, facets(results)))
    return finished, unfinished, excluded


# --------------------------------------------------------------------------- statistics

def mean_std(values):
    """(mean, sample std with ddof 1 or None for fewer than 2 values, n) of the non-None values."""
    values = [v for v in values if v is not None]
    n = len(values)
    if not n:
        return None, None, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else None
    return mean, std, n


def fmt(mean, std, digits=2):
    if mean is None:
        return DASH
    return f"{mean:.{digits}f} ± {DASH if std is None else f'{std:.{digits}f}'}"


# --------------------------------------------------------------------------- tables

def matches(run: RunRecord, match: dict, network: str | None) -> bool:
    for key, want in match.items():
        have = run.facets.get(key)
        if key == "archs":
            if run.facets.get("method") == "vanilla":  # Vanilla trains the cell's network alone
                if network is None or have != [network]:
                    return False
                continue
            want = sorted(want)
        if isinstance(want, (int, float)) and isinstance(have, (int, float)) and not isinstance(want, bool):
            if isinstance(have, bool) or not math.isclose(want, have, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif have != want:
            return False
    return True


@dataclass
class Cell:
    table: str
    row: str
    column: str
    network: str | None
    role: str | None
    metric: str
    paper: float | None
    paper_std: float | None
    runs: list
    value: dict | None = None

    def values(self):
        """(best values, final values) of the cell's runs (hours: total wall time, no 'final'; error: 100 - top-1)."""
        if self.metric == "hours":
            return [r.results.get("wall_time_s", 0) / 3600 for r in self.runs], []
        if self.value:
            pairs = [(r.facets.get(self.value["best"]), r.facets.get(self.value.get("final"))) for r in self.runs]
            pairs = [p for p in pairs if p[0] is not None]
        else:
            pairs = [r.accuracy(self.network, self.role) for r in self.runs]
            pairs = [p for p in pairs if p is not None]
        if self.metric == "error":
            pairs = [tuple(None if v is None else 100.0 - v for v in p) for p in pairs]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def build_cells(table: dict, runs) -> list[list[Cell]]:
    """The table's grid of cells (rows x columns), each with the runs it claims."""
    grid = []
    for row in table["rows"]:
        cells = []
        for j, column in enumerate(table["columns"]):
            network = row.get("network") or column.get("network")
            role = None if network else column.get("role") or row.get("role")
            match = {**table.get("match", {}), **row.get("match", {}), **column.get("match", {})}
            paper = row["paper"][j]
            mean, std = (paper if isinstance(paper, list) else (paper, None))
            claimed = [r for r in runs if r.experiment == table["id"] and matches(r, match, network)]
            cells.append(Cell(table["id"], row["name"], column["name"], network, role,
                              column.get("metric", table.get("metric", "top1")), mean, std, claimed,
                              row.get("value") or column.get("value")))
        grid.append(cells)
    return grid


def cell_text(cell: Cell) -> str:
    best, final = cell.values()
    b_mean, b_std, n = mean_std(best)
    parts = []
    if n:
        if cell.metric == "hours":
            parts.append(f"{fmt(b_mean, b_std)} h (n={n})")
        else:
            f_mean, f_std, _ = mean_std(final)
            parts.append(f"{fmt(b_mean, b_std)} / {fmt(f_mean, f_std)} (n={n})")
    elif cell.runs:
        parts.append(f"no {cell.network or cell.role or (cell.value or {}).get('best')} in its runs")
    else:
        parts.append(DASH)
    if cell.paper is not None:
        paper = f"{cell.paper:.2f}" + (f" ± {cell.paper_std:.2f}" if cell.paper_std is not None else "")
        diff = f" ({b_mean - cell.paper:+.2f})" if n else ""
        parts.append(f"paper {paper}{diff}")
    return " · ".join(parts)


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- groups

def group_runs(runs):
    """{(experiment, method, name, signature): [runs]} in a stable order."""
    groups: dict = {}
    for run in runs:
        key = (run.experiment, run.facets.get("method", "?"), run.name, signature(run))
        groups.setdefault(key, []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: kv[0][:3]))


def network_rows(runs):
    """One row per network of a group: role, arch, best and final mean ± std, n, seeds, epochs."""
    rows = []
    for role, info in runs[0].results["networks"].items():
        best = mean_std([r.results["networks"].get(role, {}).get("best_top1") for r in runs])
        final = mean_std([r.results["networks"].get(role, {}).get("final_top1") for r in runs])
        rows.append((role, info.get("arch"), best, final))
    seeds = sorted(r.results.get("seed") for r in runs)
    epochs = sorted({r.results.get("epochs") for r in runs})
    return rows, seeds, epochs


# --------------------------------------------------------------------------- output

def has_runs(cells) -> bool:
    return any(cell.runs for cell in cells)


def markdown(root, tables, runs, unfinished, excluded, show_all=False) -> str:
    out = [f"# Results below {root}", "", LEGEND, ""]
    claimed = set()
    experiments = sorted({r.experiment for r in runs} | {experiment_of(root, d) for d in unfinished})
    groups = group_runs(runs)
    for table in tables:
        grid = build_cells(table, runs)
        shown = [cells for cells in grid if show_all or has_runs(cells)]
        if not shown and table["id"] not in experiments:
            continue
        out += [f"## {table['title']}", ""]
        if table.get("metric") == "error":
            out += ["Top-1 ERROR % (100 - top-1): best = the lowest error over training.", ""]
        header = [""] + [c["name"] for c in table["columns"]]
        if shown:
            out.append(markdown_table(header, [[cells[0].row] + [cell_text(c) for c in cells] for cells in shown]))
        else:
            out.append("No run matches a cell of this table yet (--all shows the published numbers).")
        out.append("")
        for cells in grid:
            for cell in cells:
                claimed.update(id(r) for r in cell.runs)
                if len({signature(r) for r in cell.runs}) > 1:
                    out.append(f"Note: the cell '{cell.row} / {cell.column}' averages runs whose settings "
                               f"differ (e.g. recipe or epochs): "
                               + ", ".join(sorted({str(r.path.relative_to(root)) for r in cell.runs})))
        out += unclaimed_section(table["id"], groups, claimed)
    known = {t["id"] for t in tables}
    for experiment in experiments:
        if experiment not in known:
            out += [f"## Experiment '{experiment}' (no table of the paper)" if experiment else "## Runs in no experiment",
                    ""]
            out += unclaimed_section(experiment, groups, claimed)
    if unfinished:
        out += ["## In progress or interrupted (not averaged)", ""]
        out += [f"- {d.relative_to(root)}: {progress(d)}" for d in unfinished]
        out.append("")
    if excluded:
        out += ["## Excluded from every mean", ""]
        out += [f"- {d.relative_to(root)}: {reason}" for d, reason in excluded]
        out.append("")
    if not runs and not unfinished:
        out.append(f"No runs below {root}.")
    return "\n".join(out).rstrip() + "\n"


def unclaimed_section(experiment, groups, claimed):
    rows = []
    for (exp, method, name, _), members in groups.items():
        if exp != experiment or all(id(r) in claimed for r in members):
            continue
        networks, seeds, epochs = network_rows(members)
        for role, arch, best, final in networks:
            rows.append([name, method, members[0].results.get("dataset", "?"), role, arch, fmt(*best[:2]),
                         fmt(*final[:2]), best[2], " ".join(map(str, seeds)), " ".join(map(str, epochs))])
    if not rows:
        return []
    return ["Runs in no cell of the table (top-1 %):" if experiment else "Runs (top-1 %):", "",
            markdown_table(["run", "method", "dataset", "network", "arch", "best ± std", "final ± std", "n", "seeds",
                            "epochs"], rows), ""]


CSV_FIELDS = ["table", "row", "column", "network", "metric", "n", "seeds", "best_mean", "best_std",
              "final_mean", "final_std", "paper", "paper_std", "best_minus_paper", "runs"]


def csv_rows(root, tables, runs, unfinished, show_all=False):
    """One row per table cell (cells with runs, or every cell with ``show_all``), then one per network of
    every group no cell claims, then in-progress runs."""
    claimed = set()
    for table in tables:
        for cells in build_cells(table, runs):
            for cell in cells:
                claimed.update(id(r) for r in cell.runs)
                if not (cell.runs or (show_all and cell.paper is not None)):
                    continue
                best, final = cell.values()
                b_mean, b_std, n = mean_std(best)
                f_mean, f_std, _ = mean_std(final)
                yield {"table": cell.table, "row": cell.row, "column": cell.column,
                       "network": cell.network or cell.role, "metric": cell.metric, "n": n,
                       "seeds": " ".join(str(r.results.get("seed")) for r in cell.runs),
                       "best_mean": b_mean, "best_std": b_std, "final_mean": f_mean, "final_std": f_std,
                       "paper": cell.paper, "paper_std": cell.paper_std,
                       "best_minus_paper": None if b_mean is None or cell.paper is None else b_mean - cell.paper,
                       "runs": " ".join(str(r.path.relative_to(root)) for r in cell.runs)}
    for (experiment, method, name, _), members in group_runs(runs).items():
        if all(id(r) in claimed for r in members):
            continue
        networks, seeds, _ = network_rows(members)
        for role, arch, (b_mean, b_std, n), (f_mean, f_std, _) in networks:
            yield {"table": experiment, "row": f"{method} {name}", "column": role, "network": arch,
                   "metric": "top1", "n": n, "seeds": " ".join(map(str, seeds)), "best_mean": b_mean,
                   "best_std": b_std, "final_mean": f_mean, "final_std": f_std,
                   "runs": " ".join(str(r.path.relative_to(root)) for r in members)}
    for run_dir in unfinished:
        yield {"table": experiment_of(root, run_dir), "row": "in progress", "runs": str(run_dir.relative_to(root)),
               "column": progress(run_dir)}


RUN_FIELDS = ["experiment", "method", "run", "seed", "dataset", "recipe", "role", "arch", "params", "best_top1",
              "best_epoch", "final_top1", "final_top5", "epochs", "epochs_planned", "wall_time_s", "git_commit", "path"]


def run_rows(root, runs):
    """One row per run and network: the fields of RUN_FIELDS, then every recorded flag (``args.*``),
    the method's settings and the network's resolved optimisation (``net.*``)."""
    for run in runs:
        settings = {k: v for k, v in run.facets.items() if k not in ("archs", "method", "dataset", "recipe", "seed",
                                                                     "epochs", "epochs_planned", "wall_time_s")}
        args = flatten(run.results.get("args", {}) if isinstance(run.results.get("args"), dict) else {}, "args.")
        for role, info in run.results["networks"].items():
            yield {"experiment": run.experiment, "method": run.results.get("method"), "run": run.name,
                   "seed": run.results.get("seed"), "dataset": run.results.get("dataset"),
                   "recipe": run.results.get("recipe"), "role": role, "arch": info.get("arch"),
                   "params": info.get("params"), "best_top1": info.get("best_top1"),
                   "best_epoch": info.get("best_epoch"), "final_top1": info.get("final_top1"),
                   "final_top5": info.get("final_top5"), "epochs": run.results.get("epochs"),
                   "epochs_planned": run.results.get("epochs_planned"), "wall_time_s": run.results.get("wall_time_s"),
                   "git_commit": (run.results.get("provenance") or {}).get("git_commit"),
                   "path": str(run.path.relative_to(root)), **settings, **args,
                   **{f"net.{k}": v for k, v in info.items() if k not in RUN_FIELDS}}


def cell_value(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    return " ".join(map(str, value)) if isinstance(value, list) else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("root", type=Path, help="folder holding the run directories (e.g. runs)")
    p.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    p.add_argument("--runs", action="store_true",
                   help="one row per run and network (with --csv: with every recorded flag) instead of the tables")
    p.add_argument("--all", action="store_true", help="every row of the paper's tables, also those without runs")
    p.add_argument("--published", type=Path, default=PUBLISHED, help="the published numbers")
    args = p.parse_args(argv)
    if not args.root.is_dir():
        print(f"summarize.py: error: no folder {args.root}", file=sys.stderr)
        return 2
    try:
        tables = json.loads(args.published.read_text())["tables"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"summarize.py: error: cannot read the published numbers {args.published} ({type(e).__name__})",
              file=sys.stderr)
        return 2
    runs, unfinished, excluded = read_runs(args.root)
    if args.runs:
        rows = list(run_rows(args.root, runs))
        fields = list(dict.fromkeys(k for row in rows for k in row)) or RUN_FIELDS
        if args.csv:
            writer = csv.DictWriter(sys.stdout, fields, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: cell_value(v) for k, v in row.items()})
        else:
            shown = ["experiment", "method", "run", "seed", "dataset", "role", "arch", "best_top1", "final_top1",
                     "epochs"]
            sys.stdout.write(markdown_table(shown, [[cell_value(row[k]) for k in shown] for row in rows]) + "\n")
        return 0
    if args.csv:
        writer = csv.DictWriter(sys.stdout, CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in csv_rows(args.root, tables, runs, unfinished, args.all):
            writer.writerow({k: cell_value(v) for k, v in row.items()})
    else:
        sys.stdout.write(markdown(args.root, tables, runs, unfinished, excluded, args.all))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)

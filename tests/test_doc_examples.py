"""Every shell example of README.md and docs/*.md runs as written.

For each ```bash block: a training command's flags parse, and the run directory it writes is
computed (its default run name, as ``utils.Run`` names it); a path an example reads
(``--teacher-ckpt``, ``evaluate.py``'s runs) must be one that an example writes. An experiment
script runs with ``--dry-run``. Lines with placeholders (``RUN_DIR``, ``$var``, ``<...>``) are
only parsed.
"""
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import utils

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def commands():
    """(document, argv) of every command of every bash block, in order."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if not line.strip() or line.strip().startswith("#"):
                    continue
                words = shlex.split(line, comments=True)
                argv = []
                for word in [*words, "&&"]:
                    if word in ("&&", ";", "|", ">"):
                        if argv:
                            found.append((doc.name, argv))
                        argv = [] if word != ">" else None
                        if argv is None:
                            break
                    else:
                        argv.append(word)
    return found


COMMANDS = commands()


def placeholder(argv) -> bool:
    return any("$" in w or "<" in w or re.search(r"\b[A-Z][A-Z_]{2,}\b", w) for w in argv)


class Captured(Exception):
    """Raised by the stand-in for ``utils.Run``: what a training script would start."""


def run_dir_of(argv, monkeypatch) -> Path:
    """The run directory ``python SCRIPT FLAGS`` writes, without building anything."""
    script = importlib.import_module(Path(argv[1]).stem)

    def capture(self, args, method, networks, **kwargs):
        raise Captured(Path(args.out) / method / (args.run_name or utils.default_run_name(args, networks)))
    monkeypatch.setattr(utils.Run, "__init__", capture)
    with pytest.raises(Captured) as caught:
        script.main(argv[2:])
    return caught.value.args[0]


def read_paths(argv) -> list[str]:
    """The run directories an example reads."""
    if Path(argv[1]).name == "evaluate.py":
        return [a for a in argv[2:] if not a.startswith("-") and "/" in a and not a.endswith("/")]
    return [argv[argv.index("--teacher-ckpt") + 1]] if "--teacher-ckpt" in argv else []


def test_the_docs_have_examples():
    scripts = {Path(argv[1]).name for _, argv in COMMANDS if argv[0] in ("python", "bash") and len(argv) > 1}
    assert {"train_switokd.py", "train_kd.py", "evaluate.py", "cpu_study.sh"} <= scripts


def test_training_examples_parse_and_read_what_an_example_wrote(monkeypatch, capsys):
    written, read = set(), []
    for doc, argv in COMMANDS:
        if argv[0] != "python" or len(argv) < 2 or not re.fullmatch(r"(train_\w+|evaluate)\.py", argv[1]):
            continue
        if placeholder(argv):
            continue
        if argv[1] == "evaluate.py":
            read += [(doc, p) for p in read_paths(argv)]
            continue
        written.add(str(run_dir_of(argv, monkeypatch)))
        read += [(doc, p) for p in read_paths(argv)]
    missing = [(doc, path) for doc, path in read if not any(path == w or path.startswith(w + "/") for w in written)]
    assert not missing, f"examples read run directories no example writes: {missing}; written: {sorted(written)}"


EXPERIMENTS = [(doc, argv) for doc, argv in COMMANDS if argv[0] == "bash" and argv[1].startswith("scripts/")]


@pytest.mark.parametrize("doc,argv", EXPERIMENTS, ids=[f"{d}:{' '.join(a[1:3])}" for d, a in EXPERIMENTS])
def test_experiment_examples_dry_run(doc, argv, tmp_path):
    args = argv[2:]
    extra = []
    if "--" in args:
        args, extra = args[:args.index("--")], args[args.index("--"):]
    if "--out" not in args and "gpu_check" not in argv[1]:
        args += ["--out", str(tmp_path)]
    done = subprocess.run(["bash", argv[1], *args, "--dry-run", *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]

"""Everything a training script needs that is not its method.

A training script parses its flags, builds one :class:`Run` and writes its epoch loop
itself, each line one call into this module::

    run = utils.Run(args, "dml", {"student": args.student, "teacher": args.teacher})
    for epoch in run.epochs():
        for images, targets in run.train_batches():
            values = train_step(...)              # the method: forward, losses, backward, steps
            run.log(values)                       # per-iteration values (tensors are fine)
        run.step_schedulers()
        run.end_epoch(run.evaluate())             # best checkpoints, metrics, last.pt, console line
    return run.finish()

The pieces are usable on their own: :func:`evaluate` scores any network or ensemble on
any loader, :class:`Precision` is the autocast/GradScaler of a run, :class:`RunDirectory`
the files of one run. Sections: interrupts and errors; flags; recipes; small pieces
(devices, files, RNG, provenance); evaluation; precision; the run directory; the console
and logs; :class:`Run`.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path


def _quiet_interrupt(signum, frame):
    raise SystemExit(130)


if Path(sys.argv[0]).name.startswith(("train_", "evaluate")):
    signal.signal(signal.SIGINT, _quiet_interrupt)  # Ctrl-C during the slow imports below: no traceback

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import fcntl  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import datasets  # noqa: E402
import models  # noqa: E402

REPO = Path(__file__).resolve().parent
DOWNLOAD_ON_FIRST_USE = ("cifar10", "cifar100")
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


# =========================================================================== errors

class UsageError(Exception):
    """Bad input (flags, files, a run directory in use); reported as one line, exit status 2."""


class TrainingDiverged(Exception):
    """A non-finite loss; reported as one line, exit status 3. The last good last.pt is kept."""


def one_line(error: Exception) -> str:
    """An error's message on one line (the last line of one re-raised from a DataLoader worker)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].split(f"{type(error).__name__}: ", 1)[-1] if lines else type(error).__name__


def main_guard(main):
    """Run ``main``: bad input ends with one line on stderr and exit 2, a diverged run with exit 3.

    A run that was training when it ended so (:attr:`Run.active`) writes that into its results.json.
    """
    prog = Path(sys.argv[0]).name
    signal.signal(signal.SIGINT, signal.default_int_handler)
    Run.active = None  # a run of an earlier main in this process is not this one's
    try:
        return main()
    except (UsageError, datasets.DatasetNotFoundError) as e:
        Run.ended("failed", one_line(e))
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        kept = Run.ended("diverged", one_line(e))
        print(f"{prog}: error: {one_line(e)}{'; ' + kept if kept else ''}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        kept = Run.ended("interrupted", "interrupted (Ctrl-C or SIGTERM)")
        print(f"{prog}: interrupted; {kept}", file=sys.stderr)
        sys.exit(130)


# =========================================================================== flags

class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default only where it has one: no "(default: None)" or "(default: False)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or action.nargs == 0):  # a switch says in its help which state is the default
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and exit 2, no abbreviated options, and run-naming groups.

    A training script adds its networks (:meth:`network_argument`) and its method's flags
    (:meth:`method_group`) first, then :func:`add_common_flags`, so that ``--help`` shows
    them in that order.
    """

    def __init__(self, description, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [options]   (--help lists them)")
        super().__init__(description=description, allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)
        self.network_dests: list[str] = []
        self._networks = None

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def network_argument(self, *flags, **kwargs):
        """A flag naming network(s) to train; its value is part of the default run name already."""
        if self._networks is None:
            self._networks = self.add_argument_group("networks (python -m models lists them)")
        action = self._networks.add_argument(*flags, **kwargs)
        self.network_dests.append(action.dest)
        return action

    def method_group(self, title):
        """The group of the method's own flags."""
        return self.add_argument_group(title)


def add_cohort_flags(p: ArgumentParser, default=("mobilenetv2_0.5", "wrn_16_2")) -> None:
    """``--models`` and ``--roles`` of the cohort methods (DML, KDCL); see :func:`cohort`."""
    p.network_argument("--models", nargs="+", default=list(default), metavar="MODEL", help="two or more networks")
    p.network_argument("--roles", nargs="+", metavar="ROLE",
                       help="one name per network, naming its files and metrics and, under --recipe official, "
                            "choosing its optimiser (default: student teacher for two networks, net1 .. netK)")


def add_branch_flags(p: ArgumentParser, method: str, branches_help: str, detach_help: str):
    """The networks and distillation flags of the OKDDip release's methods (train_okddip.py,
    train_one.py); returns the method's group, for its own flags. Parse with :func:`parse_branch_args`."""
    from models.okddip import BACKBONES
    p.network_argument("--backbone", default="resnet32", choices=BACKBONES,
                       help="the release's backbone (resnet110 and wrn_20_8 are its bottleneck variants)")
    p.network_argument("--branches", type=number(int, 2), default=4, metavar="M", help=branches_help)
    p.network_argument("--shared-dense-block", action="store_true",
                       help="densenet40_12: every branch holds the SAME block 3, the release's bug (default: "
                            "one block per branch, as intended)")
    g = p.method_group(method)
    g.add_argument("--tau", type=POSITIVE, default=3.0, help="temperature T of every KL term (T^2 inside)")
    g.add_argument("--alpha", type=NON_NEGATIVE, default=1.0, help="weight of the distillation terms")
    g.add_argument("--ramp-length", type=number(int, 0), default=80, metavar="EPOCHS",
                   help="L of the ramp w(e) = exp(-5 (1 - e/L)^2), e the 0-based epoch (0: w = 1 throughout)")
    g.add_argument("--detach-targets", action="store_true", help=detach_help)
    return g


def parse_branch_args(p: ArgumentParser, argv=None) -> argparse.Namespace:
    """:func:`parse_args` for the OKDDip release's methods: ``--recipe okddip`` by default, the flags checked."""
    add_common_flags(p)
    p.set_defaults(recipe="okddip")
    args = parse_args(p, argv)
    if args.shared_dense_block and (args.backbone != "densenet40_12" or getattr(args, "network_based", False)):
        p.error("--shared-dense-block applies to the branch-based densenet40_12 only")
    return args


def branch_settings(args) -> dict:
    """The values of :func:`add_branch_flags`' flags (and ``--detach-targets``), for results.json."""
    return {key: getattr(args, key) for key in ("branches", "shared_dense_block", "tau", "alpha", "ramp_length",
                                                 "detach_targets")}


def cohort(names: list[str], roles: list[str] | None = None) -> dict:
    """The networks as {role: model name}, checking the roles (see :func:`add_cohort_flags`)."""
    if len(names) < 2:
        raise UsageError(f"--models needs two or more networks, got {len(names)}")
    roles = roles or (["student", "teacher"] if len(names) == 2 else [f"net{k + 1}" for k in range(len(names))])
    if len(roles) != len(names):
        raise UsageError(f"--roles names {len(roles)} networks but --models gives {len(names)}")
    for role in roles:
        if not role.isidentifier():
            raise UsageError(f"bad role name {role!r}; use letters, digits and _, starting with a letter")
    if len(set(roles)) != len(roles):
        raise UsageError(f"--roles must be distinct, got {' '.join(roles)}")
    return dict(zip(roles, names))


def parse_args(p: ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; the namespace also remembers the defaults and network flags (for run names)."""
    args = p.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    args._defaults = {a.dest: a.default for a in p._actions if a.dest != "help"}
    args._network_dests = tuple(p.network_dests)
    return args


def number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """argparse type: a finite ``kind`` within [low, high] (open ends when asked), the bad value named."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = f"{'an integer' if kind is int else 'a number'}{' ' + ' and '.join(bounds) if bounds else ''}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, 1)
POSITIVE = number(float, 0, low_open=True)
NON_NEGATIVE = number(float, 0)

MAY_CHANGE_ON_RESUME = ("epochs", "workers", "threads", "no_progress", "log_interval", "print_every", "data_root",
                        "download", "device", "out", "run_name", "resume")
"""Flags that ``--resume`` accepts with a new value (``--epochs`` only larger, to extend the run;
``--out`` and ``--run-name`` only locate it, e.g. a copied run root, or the default name spelled out).
Every other flag must equal the one the run was started with."""

NOT_IN_RUN_NAME = ("dataset", "seed", "data_root", "download", "loader", "workers", "threads", "device", "amp",
                   "channels_last", "compile", "sync_bn", "deterministic", "out", "run_name", "resume",
                   "log_interval", "print_every", "no_progress", "epochs")
"""Flags that the default run name leaves out (they do not define the experiment, or are in it already)."""


def add_common_flags(p: ArgumentParser) -> None:
    """The flags every training script shares, after its networks and method flags."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=datasets.NAMES, help="the data set")
    g.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "./data"),
                   help="folder holding the datasets (environment variable DATA_ROOT)")
    g.add_argument("--download", action="store_true",
                   help="download a missing dataset (CIFAR-10/100 always are, on first use)")
    g.add_argument("--loader", default="auto", choices=("auto", "torch", "tensor"),
                   help="torch: DataLoader with torchvision transforms; tensor: the whole set on the "
                        "device, augmented in batches; auto: tensor for in-memory sets")
    g.add_argument("--workers", type=number(int, 0), default=DEFAULT_WORKERS,
                   help="DataLoader worker processes (--loader torch)")
    g.add_argument("--synthetic", nargs="+", type=synthetic_option, metavar="KEY=N",
                   help="--dataset synthetic only: its size and classes, e.g. num_classes=100 train_size=5000 "
                        f"(keys {', '.join(datasets.SYNTHETIC_DEFAULTS)}; defaults "
                        f"{' '.join(f'{k}={v}' for k, v in datasets.SYNTHETIC_DEFAULTS.items())})")
    g.add_argument("--train-subset", type=POSITIVE_INT, metavar="N",
                   help="train on a fixed class-balanced subset of N images (default: all)")
    g.add_argument("--test-subset", type=POSITIVE_INT, metavar="N",
                   help="test on a fixed class-balanced subset of N images (default: all)")
    g = p.add_argument_group("optimisation (defaults: the recipe's, see docs/FIDELITY.md)")
    g.add_argument("--recipe", default="paper", choices=RECIPE_NAMES,
                   help="paper: Sec. 3.1 of the paper; official: the authors' released scripts (also their "
                        "networks, initialisation and schedule timing; where no released script exists, "
                        "extrapolated from the dataset's); okddip: the OKDDip release; crd: the CRD benchmark")
    g.add_argument("--epochs", type=POSITIVE_INT,
                   help="epochs (default: the recipe's); fewer scale the LR milestones in proportion")
    g.add_argument("--batch-size", type=POSITIVE_INT, help="training batch, all processes together "
                   "(default: the recipe's)")
    g.add_argument("--test-batch-size", type=POSITIVE_INT, help="evaluation batch (default: the recipe's)")
    g.add_argument("--lr", type=POSITIVE, help="initial learning rate of every network (default: the recipe's, "
                   "per network)")
    g.add_argument("--lr-drop", choices=LR_DROPS,
                   help="after: a milestone m drops the rate after epoch m (m epochs at the old rate, "
                        "MultiStepLR); start: at the start of epoch m (m-1 epochs, the released scripts) "
                        "(default: the recipe's)")
    g.add_argument("--arch-variant", choices=models.VARIANTS,
                   help="paper: the standard published architectures; official/okddip: those of the "
                        "released model files; crd: RepDistiller's (option-B ResNet shortcuts) "
                        "(default: the recipe's)")
    g.add_argument("--script-init", choices=("none", "official"),
                   help="official: re-draw the weights of the networks that a released training script "
                        "re-draws (Tiny-ImageNet: every network; three networks: the MobileNet), and only those "
                        "(default: the recipe's)")
    g.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seeds Python, NumPy and torch")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument("--threads", type=POSITIVE_INT, default=default_threads(),
                   help="CPU threads of torch's operators (default: OMP_NUM_THREADS, else the CPUs this process may "
                        "use; on a shared machine, fewer run faster; the numbers can differ in the last bits)")
    g.add_argument("--amp", nargs="?", const="bf16", choices=("bf16", "fp16"),
                   help="autocast the forward passes (fp16 adds a GradScaler; bare --amp: bf16)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE_BACKENDS, metavar="BACKEND",
                   help="torch.compile every network (bare --compile: inductor; aot_eager/eager to debug)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (CUDA only)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (CPU runs are deterministic already)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="checkpoints", help="root of the run directories: <out>/<method>/<run-name>/")
    g.add_argument("--run-name",
                   help="default: <dataset>-<networks>[-<flag>=<value> ...]-seed<seed>, with every flag that "
                        "differs from its default in the order of this help (a recipe by its name alone, e.g. "
                        "cifar100-resnet20-wrn_16_2-tau=2.0-official-seed0)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in the run directory (only with the same flags; --epochs may grow)")
    g.add_argument("--log-interval", type=POSITIVE_INT, default=1, help="iterations between TensorBoard points")
    g.add_argument("--print-every", type=POSITIVE_INT,
                   help="iterations between progress lines when stderr is not a terminal (default: a tenth "
                        "of an epoch; none for an epoch of fewer than 50 iterations)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def synthetic_option(text: str) -> str:
    """argparse type of ``--synthetic``: ``KEY=N`` with a key of the synthetic set and a positive integer."""
    key, _, value = text.partition("=")
    if key not in datasets.SYNTHETIC_DEFAULTS or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected KEY=N with KEY one of {', '.join(datasets.SYNTHETIC_DEFAULTS)} "
                                         f"and N a positive integer, got {text!r}")
    return f"{key}={int(value)}"


def default_threads() -> int:
    """OMP_NUM_THREADS when set (a positive integer), else the CPUs this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synthetic_options(args) -> dict | None:
    """``--synthetic`` as the data layer takes it (``{"num_classes": 100, ...}``), or None."""
    return {k: int(v) for k, v in (o.split("=") for o in args.synthetic)} if args.synthetic else None


def default_run_name(args, networks: dict) -> str:
    """<dataset>-<networks>[-<flag>=<value> ...]-seed<seed>, naming every flag given a non-default
    value (but those of :data:`NOT_IN_RUN_NAME`) in the parser's order, a recipe by its name alone, so
    that two experiments never share a run directory by default; a branch-based network
    ``okddip:resnet32`` is written ``okddip-resnet32`` (':' separates TensorBoard's log-directory names
    and is not allowed in Windows paths). Call it before the recipe's defaults are filled in."""
    parts = [args.dataset, *(name.replace(":", "-") for name in networks.values())]
    defaults = getattr(args, "_defaults", {})
    for key, value in vars(args).items():
        if key.startswith("_") or key in NOT_IN_RUN_NAME or key in getattr(args, "_network_dests", ()):
            continue
        if key in defaults and value != defaults[key]:
            shown = "_".join(map(str, value)) if isinstance(value, list) else value
            parts.append(str(shown) if key == "recipe" else f"{key}={shown}")
    return "-".join(map(str, parts)) + f"-seed{args.seed}"


# =========================================================================== recipes

LR_DROPS = ("after", "start")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One network's optimiser and schedule (lr x gamma at each milestone), and the run's sizes.

    ``lr_drop``: ``after`` = a milestone m takes effect after epoch m (MultiStepLR stepped
    after every epoch: m epochs at the old rate); ``start`` = at the start of epoch m,
    counted from 1 (m - 1 epochs), as the released SwitOKD and OKDDip scripts do.
    ``variant`` names the architectures (``models.VARIANTS``); ``script_init`` says that
    the released training script re-draws this network's weights (see ``models``).
    """

    optimizer: str
    lr: float
    weight_decay: float
    milestones: tuple[int, ...]
    epochs: int
    momentum: float = 0.9
    nesterov: bool = False
    gamma: float = 0.1
    batch_size: int = 128
    test_batch_size: int = 100
    lr_drop: str = "after"
    variant: str = "paper"
    script_init: bool = False


_CIFAR_PAPER = Recipe("adam", 0.01, 1e-4, (140, 200, 250), 300)
_IMAGENET_STEPS = (30, 60, 90)

PAPER_RECIPES = {
    "cifar10": {"*": _CIFAR_PAPER},
    "cifar100": {"*": _CIFAR_PAPER},
    "tinyimagenet": {"*": Recipe("sgd", 0.01, 5e-4, (100, 140, 180), 200, test_batch_size=128)},
    "imagenet": {"*": Recipe("sgd", 0.1, 5e-4, _IMAGENET_STEPS, 120, batch_size=512, test_batch_size=512)},
}
"""Sec. 3.1 of the paper: Adam for CIFAR, SGD for Tiny-ImageNet and ImageNet."""

_RELEASED = dict(lr_drop="start", variant="official")
_SGD_CIFAR100 = Recipe("sgd", 0.1, 5e-4, (140, 200, 250), 299, **_RELEASED)
OFFICIAL_RECIPES = {
    "cifar10": {"*": Recipe("sgd", 0.1, 5e-4, (100, 150, 200), 299, **_RELEASED)},
    "cifar100": {"teacher": _SGD_CIFAR100, "*": dataclasses.replace(_SGD_CIFAR100, lr=0.01)},
    "cifar100/three-networks": {
        "mobilenet": Recipe("adam", 0.01, 1e-4, (140, 200, 250), 269, script_init=True, **_RELEASED),
        "*": dataclasses.replace(_SGD_CIFAR100, epochs=269)},
    "tinyimagenet": {"*": Recipe("sgd", 0.01, 5e-4, (100, 140, 180), 199, test_batch_size=128,
                                 script_init=True, **_RELEASED)},
    "imagenet": {"*": Recipe("sgd", 0.1, 1e-4, _IMAGENET_STEPS, 120, batch_size=512, test_batch_size=512,
                             variant="official")},
}
"""What the authors' released scripts run (docs/FIDELITY.md). Two-network
CIFAR-100 keys by role; the three-network scripts key by network (their two students train
differently); the ImageNet script counts epochs from 0, so its drops fall after epoch m."""

RELEASED_SCRIPTS = {
    ("switokd", "cifar10"): {"wrn_16_1", "wrn_16_8"},
    ("switokd", "cifar100"): {"mobilenetv2_0.5", "wrn_16_2"},
    ("switokd", "tinyimagenet"): {"mobilenetv2_1.4", "resnet34"},
    ("switokd", "imagenet"): {"resnet18", "resnet34"},
    ("switokd_multi", "cifar100"): {"wrn_16_10", "wrn_16_2", "mobilenet"},
}
"""The (method, dataset): networks that a released script trains; ``--recipe official`` extrapolates the rest."""

OKDDIP_RECIPES = {dataset: {"*": Recipe("sgd", 0.1, 5e-4, (150, 225), 300, nesterov=True, test_batch_size=128,
                                        lr_drop="start", variant="okddip")}
                  for dataset in ("cifar10", "cifar100")}
"""The OKDDip release (docs/OKDDIP.md R3): Nesterov SGD, wd 5e-4 on every
parameter, x0.1 at 150 and 225 of 300 epochs, taking effect one epoch early."""

_CRD = Recipe("sgd", 0.05, 5e-4, (150, 180, 210), 240, batch_size=64, test_batch_size=64, variant="crd")
CRD_RECIPES = {dataset: {"mobilenetv2*": dataclasses.replace(_CRD, lr=0.01), "*": _CRD}
               for dataset in ("cifar10", "cifar100")}
"""The CRD benchmark (Tian et al., 2020; RepDistiller): SGD lr 0.05 (0.01 for MobileNetV2
students), momentum 0.9, wd 5e-4, batch 64, x0.1 at 150/180/210 of 240 epochs, RepDistiller's
networks (``models`` variant ``crd``: option-B ResNet shortcuts)."""

RECIPES = {"paper": PAPER_RECIPES, "official": OFFICIAL_RECIPES, "okddip": OKDDIP_RECIPES, "crd": CRD_RECIPES}
RECIPE_NAMES = tuple(RECIPES)
OFFLINE_SETS = ("mnist", "fashionmnist", "digits", "synthetic")  # in no paper: they borrow CIFAR-100's recipes


def recipe_for(name: str, dataset: str, role: str, network: str | None = None, script: str | None = None) -> Recipe:
    """The recipe ``name`` for the network ``network`` trained as ``role`` on ``dataset``.

    A table is looked up by network name (a trailing ``*`` matches a prefix), then by role
    (``teacher2`` takes the entry of ``teacher``), then ``*``. ``script`` selects a released
    script's own table (e.g. ``"three-networks"``) where the recipe has one.
    """
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose from {', '.join(RECIPE_NAMES)}")
    tables = RECIPES[name]
    dataset = "cifar100" if dataset in OFFLINE_SETS else dataset
    if dataset not in tables:
        raise UsageError(f"recipe {name!r} has no setting for {dataset}; it covers {', '.join(sorted(tables))}")
    table = tables.get(f"{dataset}/{script}", tables[dataset])
    for key in (network, role.rstrip("0123456789"), "*"):
        for pattern, recipe in table.items():
            if key is not None and (pattern == key or (pattern.endswith("*") and pattern != "*"
                                                       and key.startswith(pattern[:-1]))):
                return recipe
    return table["*"]


def scaled_milestones(recipe: Recipe, epochs: int) -> list[int]:
    """The recipe's milestones, scaled in proportion when ``epochs`` is shorter than the recipe's."""
    if epochs >= recipe.epochs:
        return list(recipe.milestones)
    return sorted({max(1, round(m * epochs / recipe.epochs)) for m in recipe.milestones})


def lr_schedule(optimizer, milestones, gamma, lr_drop):
    """MultiStepLR, stepped after every epoch, realising ``lr_drop`` for 1-based milestone epochs.

    ``after``: the scheduler's milestones are the epochs themselves; ``start``: one earlier
    (a milestone at epoch 1 cannot take effect before the first epoch and stays at 1).
    """
    if lr_drop not in LR_DROPS:
        raise ValueError(f"unknown lr_drop {lr_drop!r}; choose from {', '.join(LR_DROPS)}")
    steps = [max(1, m - 1) for m in milestones] if lr_drop == "start" else list(milestones)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=gamma)


def build_optimizer(params, recipe: Recipe, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov if the recipe says, weight decay) or Adam (beta1 = momentum, L2 decay)."""
    lr = recipe.lr if lr is None else lr
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               nesterov=recipe.nesterov)
    return torch.optim.Adam(params, lr=lr, betas=(recipe.momentum, 0.999), weight_decay=recipe.weight_decay)


def optimizer_settings(recipe: Recipe, lr: float | None, milestones, lr_drop) -> dict:
    """What results.json records of one network's optimisation, as resolved."""
    return {"optimizer": recipe.optimizer, "lr": recipe.lr if lr is None else lr, "momentum": recipe.momentum,
            "nesterov": recipe.nesterov, "weight_decay": recipe.weight_decay, "milestones": list(milestones),
            "gamma": recipe.gamma, "lr_drop": lr_drop}


# =========================================================================== small pieces

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; only ``cpu``, ``cuda`` and ``cuda:N`` of a present GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return device


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename, so ``path`` is never half written.

    A failure (disk full, read-only folder, ...) raises UsageError naming the file and the cause.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UsageError(f"cannot write {path}: {full_disk(path.parent) or cause}") from None
    finally:
        tmp.unlink(missing_ok=True)


def full_disk(folder: Path) -> str | None:
    """'no space left on device' (or '... no free inodes') when the file system of ``folder`` is full."""
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_files and fs.f_favail == 0:
        return "no space left on device (no free inodes)"
    return "no space left on device" if fs.f_bavail * fs.f_frsize < 2**20 else None


def save_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_trace(path: Path, trace: list[dict]) -> None:
    """A per-iteration record as one .npz: ``trace`` holds one dict of per-iteration arrays per epoch
    (rows may have columns); they are concatenated, an ``epoch`` column added, ``expert`` stored as uint8."""
    arrays = {key: np.concatenate([np.asarray(t[key]) for t in trace]) for key in trace[0]}
    if "expert" in arrays:
        arrays["expert"] = arrays["expert"].astype(np.uint8)
    first = next(iter(trace[0]))
    arrays["epoch"] = np.concatenate([np.full(len(t[first]), i + 1, np.int32) for i, t in enumerate(trace)])
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz"
        np.savez_compressed(f, **arrays)


def load_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None when the file is missing or is not one."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def load_checkpoint(path: Path) -> dict:
    """``torch.load`` with a one-line error for a missing or corrupt file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UsageError(f"no checkpoint at {path}") from None
    except Exception as e:  # torch raises many types for a damaged file
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                         "delete it or start a new run with another --run-name") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def provenance(device: torch.device, argv: list[str] | None = None) -> dict:
    """The code version (git commit, uncommitted changes), the libraries and the machine of a run, and
    its command line (``argv``, the flags as parsed; default: this process's)."""
    def git(*args):
        try:
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    import torchvision
    return {
        "git_commit": commit, "git_dirty": None if commit is None else bool(dirty),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "hostname": platform.node(),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over every process (the tensor itself with one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.detach().clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


# =========================================================================== evaluation

@torch.no_grad()
def evaluate_outputs(outputs, modules, loader, autocast=nullcontext) -> dict:
    """Top-1, top-5 (%) and mean cross-entropy of every named output over ``loader``.

    ``outputs(images)`` returns ``{name: logits}`` (e.g. each network and an ensemble);
    ``modules`` are put in eval mode meanwhile. Sums are taken over every process.
    """
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    totals = {}
    for images, targets, *_ in loader:
        with autocast():
            named = outputs(images)
        for name, logits in named.items():
            logits = logits.float()
            hits = logits.topk(min(5, logits.size(1)), dim=1).indices == targets[:, None]
            batch = torch.stack([F.cross_entropy(logits, targets, reduction="sum"), hits[:, 0].sum(),
                                 hits.any(1).sum(), torch.tensor(len(targets), device=logits.device)]).double()
            totals[name] = totals[name] + batch if name in totals else batch
    for m, mode in zip(modules, modes):
        m.train(mode)
    names = list(totals)
    stacked = torch.stack([totals[n] for n in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
    return {name: {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n}
            for name, (loss, top1, top5, n) in zip(names, stacked.tolist())}


def evaluate(model, loader, autocast=nullcontext) -> dict:
    """Top-1, top-5 (%) and mean cross-entropy of a network, or of the ensemble (mean logits) of a list."""
    nets = list(model) if isinstance(model, (list, tuple)) else [model]
    return evaluate_outputs(lambda x: {"net": torch.stack([net(x).float() for net in nets]).mean(0)},
                            nets, loader, autocast)["net"]


def mean_metrics(metrics: list[dict]) -> dict:
    """Several outputs' metrics averaged key by key (e.g. the mean top-1, top-5 and loss of a model's branches:
    what the OKDDip release reports for ONE, CL-ILR and individual branches)."""
    return {key: sum(m[key] for m in metrics) / len(metrics) for key in metrics[0]}


# =========================================================================== precision

class Precision:
    """Autocast and loss scaling of a run (``--amp``).

    Forward passes run under :meth:`autocast`; :meth:`backward` and :meth:`step` go through a
    GradScaler under fp16 (a no-op otherwise).
    """

    DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, device: torch.device, amp: str | None = None):
        self.dtype, self.device_type = self.DTYPES[amp], device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """Step the given optimisers only (and the GradScaler once)."""
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()


# =========================================================================== the run directory

class RunDirectory:
    """The files of one run: an exclusive lock, atomic writes, stale temporaries cleaned.

    The lock is an ``fcntl`` lock on ``.lock``, held for the life of the process and
    released by the kernel when it ends, however it ends: a lock file left behind by a
    killed run is not a lock. The file names the holder's pid.
    """

    _held: dict = {}  # path -> lock file of this process (a run that ended by an exception leaves it)

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None
        self.created = False

    def create_and_lock(self) -> None:
        earlier = self._held.pop(self.path.resolve(), None)
        if earlier is not None:  # this process's own, from a run that did not finish: not a concurrent run
            earlier.close()
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "a+")
        except OSError as e:
            raise UsageError(f"cannot use run directory {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(f"{self.path} is in use by {holder}; wait for it or pass another --run-name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}\n")
        handle.flush()
        self._lock = self._held[self.path.resolve()] = handle
        for stale in self.path.glob(".*.tmp*"):  # left by a killed run; none of ours exist yet
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock is not None:
            self._held.pop(self.path.resolve(), None)
            self._lock.close()
            self._lock = None

    def discard(self) -> None:
        """Remove the folder if this process created it (a run that failed before it began), then unlock."""
        if self.created and self._lock is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def __truediv__(self, name):
        return self.path / name


# =========================================================================== console and logs

def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class IterationLog:
    """Per-iteration values of one epoch: TensorBoard points, epoch means, progress.

    Values may be device tensors: they are copied to the host together every ``flush_every``
    iterations (one transfer), never one by one. A non-finite value stops the run
    (:class:`TrainingDiverged`) naming the epoch and iteration.
    """

    def __init__(self, writer, log_interval: int):
        self.writer, self.log_interval = writer, log_interval
        self.pending: list[tuple[int, dict]] = []
        self.start_epoch(0, 0)

    def start_epoch(self, epoch: int, global_step: int) -> None:
        self.epoch, self.global_step, self.iteration = epoch, global_step, 0
        self.sums: dict[str, float] = {}
        self.count = 0
        self.last: dict[str, float] = {}

    def add(self, values: dict) -> None:
        self.iteration += 1
        self.global_step += 1
        self.pending.append((self.iteration, values))

    def flush(self) -> None:
        if not self.pending:
            return
        flat = [(k, v) for _, values in self.pending for k, v in values.items()]
        on_device = [i for i, (_, v) in enumerate(flat) if torch.is_tensor(v)]
        fetched = torch.stack([flat[i][1].detach().reshape(()).double() for i in on_device]).tolist() \
            if on_device else []
        numbers = [None if torch.is_tensor(v) else float(v) for _, v in flat]
        for i, value in zip(on_device, fetched):
            numbers[i] = value
        step, at = self.global_step - len(self.pending), 0
        for iteration, values in self.pending:
            step += 1
            row = dict(zip(values, numbers[at:at + len(values)]))
            at += len(values)
            bad = [k for k, v in row.items() if not math.isfinite(v)]
            if bad:
                self.pending = []
                raise TrainingDiverged(f"non-finite {', '.join(bad)} at epoch {self.epoch}, iteration {iteration}")
            for k, v in row.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
                if self.writer is not None and step % self.log_interval == 0:
                    self.writer.add_scalar(f"iter/{k}", v, step)
            self.last = row
        self.count += len(self.pending)
        self.pending = []

    def means(self) -> dict:
        self.flush()
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


SHORT_EPOCH = 50
"""Iterations below which an epoch prints no progress lines to a file unless ``--print-every`` asks."""


class Console:
    """What a person sees: a start banner, a progress bar (a terminal) or progress lines (a file),
    one line per epoch, a final summary. Only the main process prints."""

    def __init__(self, enabled: bool, progress: bool, print_every: int | None):
        self.enabled, self.progress, self.print_every = enabled, progress, print_every
        self.tty = sys.stderr.isatty()

    def print(self, text: str = "") -> None:
        if self.enabled:
            print(text, flush=True)

    def iterations(self, iterable, total: int, label: str, status):
        """``iterable`` with a tqdm bar on a terminal, else a plain line every ``print_every`` iterations.

        ``status()`` gives the running values to show (it may copy them from the device).
        """
        if not (self.enabled and self.progress):
            yield from iterable
            return
        if self.tty:
            from tqdm import tqdm
            bar = tqdm(iterable, total=total, desc=label, leave=False, dynamic_ncols=True)
            for i, item in enumerate(bar, 1):
                yield item
                if i % 20 == 0 or i == total:
                    bar.set_postfix_str(status(), refresh=False)
            return
        every = self.print_every or (total // 10 if total >= SHORT_EPOCH else None)
        if every is None:  # a short epoch: its epoch line is enough
            yield from iterable
            return
        start = time.perf_counter()
        for i, item in enumerate(iterable, 1):
            yield item
            if i % every == 0 and i < total:
                elapsed = time.perf_counter() - start
                print(f"  {label} iter {i}/{total} ({100 * i // total}%)  {i / elapsed:.2f} it/s  "
                      f"epoch ETA {duration(elapsed * (total - i) / i)}  {status()}", file=sys.stderr, flush=True)


def is_loss(name: str) -> bool:
    """Whether a logged value is a loss (shown on the console; everything goes to TensorBoard)."""
    return name.endswith(("ce", "kl", "loss"))


def short(values: dict, keys=None, digits=3) -> str:
    keys = keys or list(values)
    return " ".join(f"{k} {values[k]:.{digits}g}" for k in keys if k in values)


# =========================================================================== the run

CHECKPOINT_KEYS = ("method", "identity", "epochs_planned", "epoch", "models", "optimizers", "schedulers",
                   "milestones", "scaler", "best", "history", "invocations", "state", "rng", "networks")
"""What ``last.pt`` holds; a resume needs every one."""


class Run:
    """One training run of one or more networks; see the module docstring for its use.

    ``Run.active`` is the run this process trains, from its start to :meth:`finish`: how it
    ended otherwise (diverged, interrupted) goes into its results.json (:meth:`ended`).

    ``networks`` maps a role (``"student"``, ``"teacher"``, ``"net"``, ...) to a model name
    of the zoo. ``script`` selects a released script's own recipe table (``recipe_for``; e.g.
    ``"three-networks"``). ``data_options`` go to the data layer (``views``, ``with_index``,
    ``holdout``: see ``datasets.make_loaders`` and ``datasets.build``).
    ``extra_modules(modules, data)`` may return ``{name: (module, owner_role)}``: trained
    modules that are not networks (a FitNet regressor, CRD's heads); each gets an optimiser
    from its owner's recipe, is checkpointed, never evaluated.

    After construction: ``nets[role]`` is the module to call (wrapped for DDP/compile when
    asked), ``modules[role]`` the plain module, ``optimizers`` and ``schedulers`` by role,
    ``precision``, ``device``, ``data`` (a ``datasets.DataBundle``), ``loaders``
    (``datasets.Loaders``), ``settings`` (the resolved per-network optimisation) and
    ``state``: a dict the method may fill, checkpointed and restored on resume.
    """

    active = None

    def __init__(self, args: argparse.Namespace, method: str, networks: dict[str, str], *,
                 script: str | None = None, data_options: dict | None = None, extra_modules=None):
        self.args, self.method = args, method
        self.start_time = time.perf_counter()
        self._init_distributed(args)
        self.main = self.rank == 0
        torch.set_num_threads(args.threads)
        if args.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True
        seed_everything(args.seed)

        self.script = script
        self.recipes = {role: recipe_for(args.recipe, args.dataset, role, name, script)
                        for role, name in networks.items()}
        run_name = args.run_name or default_run_name(args, networks)
        if not run_name or run_name in (".", "..") or "/" in run_name or "\0" in run_name:
            raise UsageError(f"--run-name {run_name!r} must name one folder inside --out (no '/', not '.' or '..')")
        self._resolve_flags(args, next(iter(self.recipes.values())))
        for name in networks.values():  # before the data: a misspelt name costs no download
            try:
                models.check_name(name)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if args.resume:  # the same: a resume with other flags (left out, say) is refused before the data loads
            self._check_record(Path(args.out) / method / run_name)
        options = dict(data_options or {})
        self.data = self._build_data(args, options.pop("holdout", 0))
        loader = args.loader if args.loader != "auto" else (
            "tensor" if self.data.train_arrays is not None else "torch")
        try:
            self.loaders = datasets.make_loaders(
                self.data, args.batch_size // self.world_size, args.test_batch_size, loader=loader,
                device=self.device, workers=args.workers, seed=args.seed, rank=self.rank,
                world_size=self.world_size, **options)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.train_loader, self.test_loader = self.loaders.train, self.loaders.test

        self.precision = Precision(self.device, args.amp)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.architectures = dict(networks)
        self.networks = list(networks)
        self.modules, self.nets, self.optimizers, self.schedulers, self.settings = {}, {}, {}, {}, {}
        for role, name in networks.items():
            self._add_module(role, self._build_network(role, name), self.recipes[role])
        for name, (module, owner) in (extra_modules(self.modules, self.data) if extra_modules else {}).items():
            self._add_module(name, module, self.recipes[owner])

        self.state: dict = {}
        self.epoch = 0
        self.best = {role: {"top1": -1.0, "epoch": 0} for role in self.networks}
        self.history: list[dict] = []
        self.invocations: list[dict] = []
        self._derived: dict = {}
        self.dir = RunDirectory(Path(args.out) / method / run_name)
        self.console = Console(self.main, not args.no_progress, args.print_every)
        self._prepare_directory()
        self.writer = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            # one step axis, the iteration: points after last.pt's last iteration (of an epoch that did not
            # end, or of an earlier attempt) are purged, so a resumed run's curves are an uninterrupted run's
            self.writer = SummaryWriter(self.dir / "tensorboard", purge_step=self.global_step + 1)
        self.iterations = IterationLog(self.writer, args.log_interval)
        self._epoch_start = time.perf_counter()
        self._banner()
        Run.active = self

    # ------------------------------------------------------------------ construction
    def _init_distributed(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = choose_device(args.device)
        if args.sync_bn and self.device.type != "cuda":
            raise UsageError(f"--sync-bn needs CUDA devices (and torchrun); SyncBatchNorm cannot run on "
                             f"{self.device.type}")
        self._owns_process_group = self.world_size > 1 and not dist.is_initialized()
        if self._owns_process_group:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _resolve_flags(self, args, first: Recipe):
        """Replace every "the recipe's" default by its value, so args.json and results.json say it."""
        self._epochs_given = args.epochs is not None
        args.epochs = args.epochs or first.epochs
        args.batch_size = args.batch_size or first.batch_size
        args.test_batch_size = args.test_batch_size or first.test_batch_size
        args.lr_drop = args.lr_drop or first.lr_drop
        args.arch_variant = args.arch_variant or first.variant
        args.device = str(self.device)
        if args.batch_size % self.world_size:
            raise UsageError(f"--batch-size {args.batch_size} is not divisible by {self.world_size} processes")

    def _build_data(self, args, holdout):
        """The dataset; the main process downloads it (if allowed) while the others wait."""
        download = args.download or args.dataset in DOWNLOAD_ON_FIRST_USE
        for turn in (True, False):
            if self.main == turn:
                try:
                    data = datasets.build(args.dataset, args.data_root, download=download and self.main,
                                          train_subset=args.train_subset, test_subset=args.test_subset,
                                          holdout=holdout, synthetic=synthetic_options(args))
                except ValueError as e:
                    raise UsageError(str(e)) from None
            if self.world_size > 1:
                dist.barrier()
        return data

    def _build_network(self, role, name):
        script_init = self.args.script_init or ("official" if self.recipes[role].script_init else "none")
        if script_init == "official" and not recipe_for("official", self.args.dataset, role, name,
                                                        self.script).script_init:
            script_init = "none"  # no released script re-draws this network
        try:
            module = models.build(name, self.data.num_classes, image_size=self.data.image_size,
                                  variant=self.args.arch_variant)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if script_init == "official":
            models.script_init(module)
        self.settings[role] = {"arch": name, "variant": self.args.arch_variant, "script_init": script_init}
        return module

    def _add_module(self, role, module, recipe):
        module = module.to(self.device, memory_format=self.memory_format)
        if self.args.sync_bn and self.world_size > 1:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        net = module
        if self.world_size > 1 and any(p.requires_grad for p in module.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if self.args.compile:
            net = torch.compile(net, backend=self.args.compile)
        optimizer = build_optimizer(module.parameters(), recipe, self.args.lr)
        milestones = scaled_milestones(recipe, self.args.epochs)
        self.modules[role], self.nets[role], self.optimizers[role] = module, net, optimizer
        self.schedulers[role] = lr_schedule(optimizer, milestones, recipe.gamma, self.args.lr_drop)
        self.settings.setdefault(role, {}).update(optimizer_settings(recipe, self.args.lr, milestones,
                                                                     self.args.lr_drop))

    # ------------------------------------------------------------------ resume
    def _identity(self) -> dict:
        """The flags that define this run (all but :data:`MAY_CHANGE_ON_RESUME`), as resolved."""
        return {k: v for k, v in vars(self.args).items() if not k.startswith("_") and k not in MAY_CHANGE_ON_RESUME}

    def _prepare_directory(self):
        """Lock the directory, then resume it or start it; every process agrees on the outcome.

        A folder this process created for a run that cannot start is removed again."""
        try:
            self._open_directory()
        except UsageError:
            self.dir.discard()
            raise

    def _open_directory(self):
        failure = None
        if self.main:
            try:
                self.dir.create_and_lock()
            except UsageError as e:
                failure = e
        if self.world_size > 1:
            flag = torch.tensor([failure is not None], dtype=torch.int32, device=self.device)
            dist.broadcast(flag, 0)
            if flag.item() and failure is None:
                raise UsageError("the main process could not use the run directory (see its error)")
        if failure is not None:
            raise failure
        last = self.dir / "last.pt"
        if self.args.resume and last.exists():
            self._load(load_checkpoint(last))
        elif last.exists():
            raise UsageError(f"{self.dir.path} already holds a run; pass --resume to continue it "
                             "(with the same flags) or --run-name to start another")
        elif self.args.resume:
            raise UsageError(f"--resume: no run to continue in {self.dir.path} (no last.pt); leave out --resume "
                             "to start it")
        self._saved_epoch, self._saved_best = self.epoch, copy.deepcopy(self.best)
        if self.main:
            self._settle_best_checkpoints()
        self.global_step = self.epoch * len(self.train_loader)
        self.invocations.append({**provenance(self.device, getattr(self.args, "_argv", None)),
                                 "from_epoch": self.epoch, "epochs": self.args.epochs, "world_size": self.world_size,
                                 "data_source": self.data.source})
        if self.main:
            atomic_write(self.dir / "metrics.jsonl",  # drops rows of an epoch whose checkpoint was lost
                         lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history)))
            save_json(self.dir / "args.json", self._record_args())

    def _load(self, ckpt):
        old = ckpt.get("identity") if isinstance(ckpt, dict) else None
        if old is None or ckpt.get("method") != self.method:
            raise UsageError(f"{self.dir / 'last.pt'} was not written by {self.method} of this version; "
                             "start a new run with another --run-name")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise UsageError(f"{self.dir / 'last.pt'} lacks {', '.join(missing)}: it cannot be resumed exactly; "
                             "start a new run with another --run-name")
        self._check_flags(old)
        planned = ckpt["epochs_planned"]
        if not self._epochs_given:  # the run's own plan, never the recipe's default
            self.args.epochs = planned
        if self.args.epochs < planned:
            raise UsageError(f"--resume: --epochs {self.args.epochs} is below the {planned} this run plans; "
                             "--epochs may only grow on resume")
        try:
            for role, module in self.modules.items():
                module.load_state_dict(ckpt["models"][role])
                self.optimizers[role].load_state_dict(ckpt["optimizers"][role])
                self.schedulers[role].load_state_dict(ckpt["schedulers"][role])  # the milestones as resolved
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UsageError(f"checkpoint {self.dir / 'last.pt'} does not match this run "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        self.epoch, self.best, self.history = ckpt["epoch"], ckpt["best"], ckpt["history"]
        self.state, self.invocations = ckpt["state"], ckpt["invocations"]
        for role, milestones in ckpt["milestones"].items():
            self.settings[role]["milestones"] = milestones
        set_rng_state(ckpt["rng"])
        if self.args.epochs > planned and self.main:
            print(f"--resume: extending from {planned} to {self.args.epochs} epochs; the learning-rate "
                  "milestones stay those of the original plan", file=sys.stderr, flush=True)

    def _check_record(self, run_dir: Path) -> None:
        """What a run directory records (results.json, else args.json) against this resume: the method,
        then the flags."""
        results = load_json(run_dir / "results.json") or {}
        if results.get("method", self.method) != self.method:
            raise UsageError(f"{run_dir / 'last.pt'} was not written by {self.method} (but by {results['method']}); "
                             "start a new run with another --run-name")
        recorded = results.get("args") if isinstance(results.get("args"), dict) else load_json(run_dir / "args.json")
        self._check_flags(recorded)

    def _check_flags(self, old: dict | None) -> None:
        """Refuse to resume a run started with other flags than this invocation's (``old``: its
        identity or args.json; None: nothing recorded yet), naming each one."""
        if old is None:
            return
        new = self._identity()
        changed = [f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}"
                   for k in sorted(set(old) | set(new)) if k not in MAY_CHANGE_ON_RESUME and old.get(k) != new.get(k)]
        if changed:
            raise UsageError(f"--resume: this run was started with other flags ({'; '.join(changed)}); give its "
                             f"flags again (they are in its args.json); only "
                             f"{', '.join('--' + k.replace('_', '-') for k in MAY_CHANGE_ON_RESUME[:-1])} "
                             "may change on resume; use another --run-name for a new run")

    def _record_args(self) -> dict:
        return {k: v for k, v in vars(self.args).items() if not k.startswith("_")}

    # ------------------------------------------------------------------ the loop
    def epochs(self):
        """Epoch numbers still to run (1-based), continuing after a resume."""
        return range(self.epoch + 1, self.args.epochs + 1)

    def train_batches(self):
        """This epoch's training batches on the device, with progress and per-iteration timing.

        Yields what the loader yields: ``(images, targets)``, plus the sample indices with
        ``data_options={"with_index": True}``.
        """
        epoch = self.epoch + 1
        for net in self.nets.values():
            net.train()
        self.train_loader.set_epoch(epoch)
        self.iterations.start_epoch(epoch, self.epoch * len(self.train_loader))
        self._timer = StepTimer(self.device)
        self._epoch_start = time.perf_counter()
        self._epoch_lrs = {role: self.optimizers[role].param_groups[0]["lr"] for role in self.networks}
        label = f"epoch {epoch}/{self.args.epochs}"
        for images, *rest in self.console.iterations(self.train_loader, len(self.train_loader), label,
                                                      self._progress_status):
            self._timer.start()
            yield images.contiguous(memory_format=self.memory_format), *rest
            self._timer.stop()

    def _progress_status(self) -> str:
        self.iterations.flush()
        return short({k: v for k, v in self.iterations.last.items() if is_loss(k)})

    def log(self, values: dict) -> None:
        """One iteration's values (floats or device tensors): TensorBoard, epoch means, progress."""
        self.iterations.add(values)
        if len(self.iterations.pending) >= 64:
            self.iterations.flush()

    def iteration_seconds(self) -> np.ndarray:
        """The wall time of each training iteration of the current epoch so far (the loop body)."""
        return self._timer.seconds()

    def step_schedulers(self) -> None:
        """Step every network's schedule (a network paused all epoch long has not stepped: fine)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
            for scheduler in self.schedulers.values():
                scheduler.step()

    def evaluate(self, outputs=None) -> dict:
        """Test metrics ``{name: {"top1", "top5", "loss"}}`` of every network (or of ``outputs``).

        ``outputs(images) -> {name: logits}`` evaluates something else (an ensemble, the
        branches of a network) in the same pass. Under DDP every process first takes rank 0's
        buffers (BatchNorm statistics: those ``last.pt`` holds).
        """
        if self.world_size > 1:
            for module in self.modules.values():
                for buffer in module.buffers():
                    dist.broadcast(buffer, 0)
        nets = {role: self.nets[role] for role in self.networks}
        if outputs is None:
            def outputs(images):
                return {role: net(images) for role, net in nets.items()}
        return evaluate_outputs(outputs, list(nets.values()), self.test_loader, self.precision.autocast)

    def add_derived_file(self, name: str, write) -> None:
        """A file rebuilt from the run's state after every epoch and at the end: ``write(path)``."""
        self._derived[name] = write

    def end_epoch(self, metrics: dict, extra: dict | None = None) -> dict:
        """Record one epoch: metrics row, TensorBoard, last.pt, best checkpoints, derived files,
        results.json, console line.

        ``metrics`` is :meth:`evaluate`'s (a network's best checkpoint follows its own top-1);
        ``extra`` the method's per-epoch values. Returns the row. A non-finite test loss or
        weight stops the run (:class:`TrainingDiverged`) before anything of the epoch is saved.
        Files are written so that none is ever newer than ``last.pt``: TensorBoard (whose points
        after ``last.pt`` a resume purges) before it, the rest after it, a new best checkpoint
        through a pending file that a resume completes.
        """
        epoch = self.epoch + 1
        train = self.iterations.means()
        self._check_finite(epoch, metrics)
        seconds = self.iteration_seconds()
        means = all_reduce_mean(torch.tensor(list(train.values()), dtype=torch.float64, device=self.device))
        row = {"epoch": epoch}
        row.update({f"lr/{role}": lr for role, lr in self._epoch_lrs.items()})
        row.update({f"train/{k}": v for k, v in zip(train, means.tolist())})
        row.update(extra or {})
        for name, values in metrics.items():
            row.update({f"test/{name}/{k}": v for k, v in values.items()})
        row["time/train_s"] = float(seconds.sum())
        row["time/iterations"] = len(seconds)
        row["time/epoch_s"] = time.perf_counter() - self._epoch_start
        row["time/elapsed_s"] = self.elapsed()
        self.epoch = epoch
        self.history.append(row)
        if not self.main:
            return row
        step = self.iterations.global_step
        for i in range(0, len(seconds), self.args.log_interval):
            self.writer.add_scalar("iter/seconds", seconds[i], step - len(seconds) + i + 1)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()
        improved = [role for role in self.networks if role in metrics
                    and metrics[role]["top1"] > self.best[role]["top1"]]
        for role in improved:
            self.best[role] = {"top1": metrics[role]["top1"], "epoch": epoch}
            save_torch(self.dir / f".best_{role}.pt.pending", self.network_checkpoint(role, metrics[role]))
        save_torch(self.dir / "last.pt", self._checkpoint())
        self._saved_epoch, self._saved_best = epoch, copy.deepcopy(self.best)
        self._settle_best_checkpoints()
        try:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write {self.dir / 'metrics.jsonl'}: {e.strerror}") from None
        self._write_derived()
        save_json(self.dir / "results.json", self._results("unfinished"))
        self._epoch_line(row, metrics)
        return row

    def _check_finite(self, epoch: int, metrics: dict) -> None:
        """A diverged epoch: a non-finite test loss, or non-finite weights or BatchNorm statistics."""
        bad = [f"test loss of {name}" for name, m in metrics.items() if not math.isfinite(m.get("loss", 0.0))]
        for role, module in self.modules.items():
            tensors = [t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()]
            if tensors and not torch.stack([torch.isfinite(t).all() for t in tensors]).all().item():
                bad.append(f"weights of {role}")
        if bad:
            raise TrainingDiverged(f"non-finite {', '.join(bad)} at the end of epoch {epoch}")

    def _settle_best_checkpoints(self) -> None:
        """A pending best checkpoint becomes ``best_<role>.pt`` once ``last.pt`` records its epoch; one that
        ``last.pt`` does not record (the process ended between the two) is dropped."""
        for pending in self.dir.path.glob(".best_*.pt.pending"):
            role = pending.name[len(".best_"):-len(".pt.pending")]
            try:
                epoch = torch.load(pending, map_location="cpu", weights_only=False).get("epoch")
            except Exception:  # noqa: BLE001 - a damaged pending file is dropped like a stale one
                epoch = None
            if role in self.best and epoch == self.best[role]["epoch"] and epoch <= self._saved_epoch:
                os.replace(pending, self.dir / f"best_{role}.pt")
            else:
                pending.unlink(missing_ok=True)

    def _epoch_line(self, row, metrics):
        losses = {k[len("train/"):]: v for k, v in row.items() if k.startswith("train/") and is_loss(k)}
        rates = sorted({f"{row[f'lr/{r}']:.3g}" for r in self.networks})
        accuracy = "  ".join(f"{name} {m['top1']:.2f}%" for name, m in metrics.items())
        extra = "  ".join(f"{' '.join(k.split('/')[1:])} {v:.1%}" for k, v in row.items()
                          if k.endswith("_fraction"))  # switch/<pair>/expert_fraction: the pair named
        per_epoch = self.elapsed() / max(1, len(self.history))
        remaining = per_epoch * (self.args.epochs - self.epoch)
        self.console.print(f"epoch {self.epoch}/{self.args.epochs}  test {accuracy}  |  train {short(losses)}  |  "
                           f"lr {'/'.join(rates)}{'  |  ' + extra if extra else ''}  |  "
                           f"{row['time/epoch_s']:.1f}s, ETA {duration(remaining)}")

    def elapsed(self) -> float:
        """Wall time of this run in seconds, resumed parts included."""
        return self.state.get("_elapsed_before", 0.0) + time.perf_counter() - self.start_time

    def finish(self, summary: dict | None = None) -> dict:
        """Write results.json (atomically) and the derived files, print the summary, close the logs.

        ``summary`` is the method's part of results.json, computed from ``state`` so that a
        finished run resumed after a crash rebuilds it without training.
        """
        Run.active = None
        results = self._results("finished" if self.epoch >= self.args.epochs else "stopped", summary)
        if self.main:
            save_json(self.dir / "results.json", results)
            self._write_derived()
            self.writer.close()
            self._summary(results)
        if dist.is_initialized():
            dist.barrier()
        if self._owns_process_group:
            dist.destroy_process_group()
        self.dir.release()
        return results

    @classmethod
    def ended(cls, status: str, reason: str) -> str:
        """The active run ended early (``status``: diverged, interrupted, failed): record it in its
        results.json (a run that failed before its first epoch leaves no folder) and say what is kept."""
        run, cls.active = cls.active, None
        if run is None:
            return "the last completed epoch is kept, continue with --resume" if status == "interrupted" else ""
        saved = run._saved_epoch
        if not saved:
            kept = "no epoch was completed, so there is no last.pt"
        elif status == "diverged":
            kept = f"last.pt keeps epoch {saved}, the last good one"
        else:
            kept = f"last.pt keeps epoch {saved}; continue with --resume"
        if run.main:
            if status == "failed" and not saved:
                run.writer.close()
                run.dir.discard()
                return ""
            run.history, run.epoch, run.best = run.history[:saved], saved, run._saved_best  # what last.pt holds
            try:
                save_json(run.dir / "results.json", {**run._results(status), "ended": reason})
            except UsageError:
                pass  # the original error is the one to report
            run.writer.close()
        run.dir.release()
        return kept

    def _results(self, status: str, summary: dict | None = None) -> dict:
        """What results.json holds: the run's status, epochs, each network's best and final accuracy,
        its settings, the method's ``summary``, the code version and every invocation, the flags."""
        last = self.history[-1] if self.history else {}
        results = {
            "method": self.method, "status": status,
            "dataset": self.args.dataset, "recipe": self.args.recipe, "seed": self.args.seed,
            "epochs": self.epoch, "epochs_planned": self.args.epochs,
            "world_size": self.world_size, "wall_time_s": self.elapsed(),
            "networks": {role: {
                **self.settings[role],
                "params": models.count_parameters(self.modules[role]),
                "best_top1": self.best[role]["top1"], "best_epoch": self.best[role]["epoch"],
                "final_top1": last.get(f"test/{role}/top1"), "final_top5": last.get(f"test/{role}/top5"),
                "final_loss": last.get(f"test/{role}/loss")} for role in self.networks},
            "auxiliary": {name: {**self.settings[name], "params": models.count_parameters(self.modules[name])}
                          for name in self.modules if name not in self.networks},
            "settings": {"batch_size": self.args.batch_size, "test_batch_size": self.args.test_batch_size,
                         "device": str(self.device), "threads": self.args.threads, "amp": self.args.amp,
                         "channels_last": self.args.channels_last,
                         "compile": self.args.compile, "world_size": self.world_size,
                         "loader": type(self.train_loader).__name__},
            **(summary or {}),
            "provenance": self.invocations[0], "invocations": self.invocations,
            "args": self._record_args(),
        }
        if not results["auxiliary"]:
            del results["auxiliary"]
        return results

    def measured(self, role: str, keys=()) -> dict:
        """What the metrics rows say of every evaluated output, around ``role``'s best epoch.

        ``best_epoch`` of ``role``; per output (``test/<name>/top1``): ``best_top1`` over the
        epochs, ``final_top1`` and ``top1_at_best`` (at ``role``'s best epoch: what a log of "the
        best epoch" holds for the other outputs); per key of the rows in ``keys``: ``final``,
        ``at_best`` and ``per_epoch``.
        """
        at_epoch = self.best[role]["epoch"]
        rows = {row["epoch"]: row for row in self.history}
        at, last = rows.get(at_epoch, {}), (self.history[-1] if self.history else {})
        names = list(dict.fromkeys(k.split("/")[1] for row in self.history for k in row
                                   if k.startswith("test/") and k.endswith("/top1")))
        out = {"best_epoch": at_epoch,
               "outputs": {name: {"best_top1": max(row.get(f"test/{name}/top1", -1.0) for row in self.history),
                                  "final_top1": last.get(f"test/{name}/top1"),
                                  "top1_at_best": at.get(f"test/{name}/top1")} for name in names}}
        for key in keys:
            out[key] = {"final": last.get(key), "at_best": at.get(key), "per_epoch": [r.get(key) for r in self.history]}
        return out

    def _write_derived(self):
        for name, write in self._derived.items():
            atomic_write(self.dir / name, write)

    def _summary(self, results):
        self.console.print(f"finished {self.method} in {duration(results['wall_time_s'])}: "
                           f"{results['epochs']}/{results['epochs_planned']} epochs")
        for role, info in results["networks"].items():
            final = info["final_top1"]
            self.console.print(f"  {role:<10} {info['arch']:<16} best {info['best_top1']:.2f}% (epoch "
                               f"{info['best_epoch']})  final {'-' if final is None else f'{final:.2f}%'}")
        self.console.print(f"  wrote {self.dir.path}/: results.json, last.pt, "
                           f"{', '.join(f'best_{r}.pt' for r in self.networks)}, metrics.jsonl, tensorboard/"
                           + "".join(f", {name}" for name in self._derived))

    def _banner(self):
        args = self.args
        verb = f"resuming at epoch {self.epoch + 1}" if self.epoch else "starting"
        self.console.print(f"{self.method}: {verb} {self.dir.path}")
        self.console.print(f"  data {args.dataset}: {len(self.data.train)} train / {len(self.data.test)} test "
                           f"images, {self.data.num_classes} classes, batch {args.batch_size}, "
                           f"{type(self.train_loader).__name__}; from {self.data.source}")
        self.console.print(f"  device {self.device}{f' x {self.world_size} processes' if self.world_size > 1 else ''}"
                           f", {args.threads} CPU thread{'s' if args.threads > 1 else ''}"
                           f", amp {args.amp or 'off'}{', channels_last' if args.channels_last else ''}"
                           f"{', compile ' + args.compile if args.compile else ''}; recipe {args.recipe}, "
                           f"{args.epochs} epochs, LR drops {args.lr_drop} milestone epochs")
        if args.recipe == "official" and RELEASED_SCRIPTS.get((self.method, args.dataset)) != set(
                self.architectures.values()):
            source = "CIFAR-100" if args.dataset in OFFLINE_SETS else args.dataset
            self.console.print(f"  note: no released script trains this; --recipe official extrapolates from the "
                               f"released {source} script (docs/FIDELITY.md)")
        for role, module in self.modules.items():
            s = self.settings[role]
            arch = f"{s['arch']} ({s['variant']})" if "arch" in s else type(module).__name__
            self.console.print(f"  {role:<10} {arch:<26} {models.count_parameters(module):>11,d} params  "
                               f"{s['optimizer']} lr {s['lr']:g} wd {s['weight_decay']:g}"
                               f"{' nesterov' if s['nesterov'] else ''}, x{s['gamma']:g} at {s['milestones']}")

    # ------------------------------------------------------------------ checkpoints
    def network_checkpoint(self, role, metrics):
        """What ``best_<role>.pt`` holds: enough for ``models.load`` to rebuild the network anywhere."""
        return {"arch": self.architectures[role], "variant": self.settings[role]["variant"],
                "num_classes": self.data.num_classes, "image_size": self.data.image_size,
                "dataset": self.args.dataset, "method": self.method, "role": role, "epoch": self.epoch,
                "metrics": metrics, "model": self.modules[role].state_dict()}

    def _checkpoint(self):  # the keys are CHECKPOINT_KEYS
        return {
            "method": self.method, "identity": self._identity(), "epochs_planned": self.args.epochs,
            "epoch": self.epoch,
            "models": {r: m.state_dict() for r, m in self.modules.items()},
            "optimizers": {r: o.state_dict() for r, o in self.optimizers.items()},
            "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()},
            "milestones": {r: s["milestones"] for r, s in self.settings.items()},
            "scaler": self.precision.scaler.state_dict(),
            "best": self.best, "history": self.history, "invocations": self.invocations,
            "state": {**self.state, "_elapsed_before": self.elapsed()},
            "rng": rng_state(),
            "networks": dict(self.architectures),
        }


class StepTimer:
    """Wall time of each training iteration without stalling the device.

    On CUDA, events are recorded around each iteration and read once, at the end of the
    epoch; on the CPU, ``time.perf_counter``.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self._begin = None

    def start(self):
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def stop(self):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.marks.append((self._begin, end))
        else:
            self.marks.append(time.perf_counter() - self._begin)

    def seconds(self) -> np.ndarray:
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
            return np.array([begin.elapsed_time(end) / 1000 for begin, end in self.marks])
        return np.array(self.marks, dtype=float)

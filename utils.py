"""Everything a training script needs that is not its method.

A script builds one :class:`Run` from its parsed flags and the networks it trains,
then writes its own loop::

    run = Run(args, "dml", {"student": args.student, "teacher": args.teacher})
    for epoch in run.epochs():
        for images, targets in run.train_batches():
            ...  # the method: forward, losses, run.backward(loss), run.step(optimizer)
            run.log_iteration({"loss": loss})
        run.end_epoch()
    run.finish()

``Run`` owns seeding, the device, data, models, optimisers and schedules (the
recipes of the paper's Sec. 3.1 and of the released scripts), AMP, channels_last,
torch.compile, DistributedDataParallel, evaluation, TensorBoard, the run directory
and exact resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import datasets
import models


DOWNLOAD_ON_FIRST_USE = ("cifar10", "cifar100")


class UsageError(Exception):
    """Bad input from the command line; reported as one line and exit status 2."""


# --------------------------------------------------------------------------- recipes

@dataclasses.dataclass(frozen=True)
class Recipe:
    """One network's optimiser and step schedule (lr x gamma at each milestone)."""

    optimizer: str
    lr: float
    weight_decay: float
    milestones: tuple[int, ...]
    epochs: int
    momentum: float = 0.9
    batch_size: int = 128
    test_batch_size: int = 100
    gamma: float = 0.1


_CIFAR_PAPER = Recipe("adam", 0.01, 1e-4, (140, 200, 250), 300)
_IMAGENET_STEPS = tuple(range(30, 120, 30))

PAPER_RECIPES = {
    "cifar10": _CIFAR_PAPER,
    "cifar100": _CIFAR_PAPER,
    "tinyimagenet": Recipe("sgd", 0.01, 5e-4, (100, 140, 180), 200),
    "imagenet": Recipe("sgd", 0.1, 5e-4, _IMAGENET_STEPS, 120, batch_size=512, test_batch_size=256),
}
"""Sec. 3.1 of the paper: Adam for CIFAR, SGD for Tiny-ImageNet and ImageNet."""

_SGD_CIFAR100 = Recipe("sgd", 0.1, 5e-4, (140, 200, 250), 299)
OFFICIAL_RECIPES = {
    "cifar10": {"*": Recipe("sgd", 0.1, 5e-4, (100, 150, 200), 299)},
    "cifar100": {"teacher": _SGD_CIFAR100, "*": dataclasses.replace(_SGD_CIFAR100, lr=0.01)},
    "cifar100/2T1S": {"teacher": dataclasses.replace(_SGD_CIFAR100, epochs=269),
                      "*": Recipe("adam", 0.01, 1e-4, (140, 200, 250), 269)},
    "tinyimagenet": {"*": Recipe("sgd", 0.01, 5e-4, (100, 140, 180), 199)},
    "imagenet": {"*": Recipe("sgd", 0.1, 1e-4, _IMAGENET_STEPS, 120, batch_size=512, test_batch_size=256)},
}
"""What the authors' released scripts run (reference/official-code-facts.md)."""

RECIPE_NAMES = ("paper", "official")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def recipe_for(name: str, dataset: str, role: str, variant: str | None = None) -> Recipe:
    """The recipe ``name`` for one network of ``role`` on ``dataset``.

    ``digits`` and ``synthetic`` have no setting in the paper; they borrow CIFAR-100's.
    ``variant`` selects a released script's own schedule (e.g. ``"2T1S"``); a numbered
    role (``teacher2``) takes the recipe of its kind.
    """
    if name not in RECIPE_NAMES:
        raise UsageError(f"unknown recipe {name!r}; choose from {', '.join(RECIPE_NAMES)}")
    dataset = dataset if dataset in PAPER_RECIPES else "cifar100"
    role = role.rstrip("0123456789")  # teacher2 trains as a teacher
    if name == "paper":
        return PAPER_RECIPES[dataset]
    table = OFFICIAL_RECIPES.get(f"{dataset}/{variant}", OFFICIAL_RECIPES[dataset])
    return table.get(role, table["*"])


def scaled_milestones(recipe: Recipe, epochs: int) -> list[int]:
    """The recipe's milestones, scaled in proportion when ``epochs`` is shorter than the recipe's."""
    if epochs >= recipe.epochs:
        return list(recipe.milestones)
    return sorted({max(1, round(m * epochs / recipe.epochs)) for m in recipe.milestones})


def build_optimizer(params, recipe: Recipe, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or Adam (beta1 = momentum, L2 weight decay), as the recipe says."""
    lr = recipe.lr if lr is None else lr
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=(recipe.momentum, 0.999), weight_decay=recipe.weight_decay)


# --------------------------------------------------------------------------- flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def common_parser(description: str) -> ArgumentParser:
    """The flags every training script shares; a script adds its networks and method flags."""
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=datasets.NAMES)
    g.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "./data"),
                   help="folder holding the datasets (env DATA_ROOT)")
    g.add_argument("--download", action="store_true",
                   help="download a missing dataset (CIFAR-10/100 always are, on first use)")
    g.add_argument("--loader", default="auto", choices=("auto", "torch", "tensor"),
                   help="torch: DataLoader with torchvision transforms; tensor: whole set on the "
                        "device, augmented in batches; auto: tensor for in-memory sets")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    g.add_argument("--train-subset", type=int, help="use only this many training images")
    g.add_argument("--test-subset", type=int, help="use only this many test images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--recipe", default="paper", choices=RECIPE_NAMES,
                   help="paper: Sec. 3.1 of the paper; official: the authors' released scripts")
    g.add_argument("--epochs", type=int,
                   help="default: the recipe's; a shorter run scales the LR milestones in proportion")
    g.add_argument("--batch-size", type=int, help="default: the recipe's")
    g.add_argument("--test-batch-size", type=int, help="default: the recipe's")
    g.add_argument("--lr", type=float, help="initial learning rate of every network (default: the recipe's)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--amp", nargs="?", const="bf16", choices=("bf16", "fp16"),
                   help="autocast the forward passes (fp16 adds a GradScaler)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE_BACKENDS, metavar="BACKEND",
                   help="torch.compile every network (BACKEND: inductor, or aot_eager/eager to debug)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (CUDA only)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (CPU runs are deterministic already)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="checkpoints", help="root of the run directories")
    g.add_argument("--run-name", help="default: <dataset>-<networks>-seed<seed>")
    g.add_argument("--resume", action="store_true", help="continue from <run dir>/last.pt")
    g.add_argument("--log-interval", type=int, default=1, help="iterations between TensorBoard points")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def positive(kind=int):
    """argparse type: a number > 0, with the bad value named in the error."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def main_guard(main):
    """Run ``main``; a bad input ends with one line on stderr and exit status 2."""
    prog = Path(sys.argv[0]).name
    try:
        return main()
    except (UsageError, datasets.DatasetNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last completed epoch is kept, continue with --resume",
              file=sys.stderr)
        sys.exit(130)


# --------------------------------------------------------------------------- small pieces

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    return device


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename, so ``path`` is never half written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast=nullcontext) -> dict:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy over ``loader``, summed over ranks."""
    was_training = model.training
    model.eval()
    totals = None
    for images, targets in loader:
        with autocast():
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.size(1)), dim=1).indices
        hits = top5 == targets[:, None]
        batch = torch.stack([F.cross_entropy(logits, targets, reduction="sum"),
                             hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(targets))
                             .to(logits.device)]).double()
        totals = batch if totals is None else totals + batch
    model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n}


# --------------------------------------------------------------------------- the run

class Run:
    """One training run of one or more networks; see the module docstring for its use.

    ``networks`` maps a role (``"student"``, ``"teacher"``, ``"net"``, ...) to a model
    name of the zoo. After construction: ``nets[role]`` is the network to train (wrapped
    for DDP/compile when asked), ``optimizers[role]`` and ``schedulers[role]`` its
    optimiser and MultiStep schedule, ``device``, ``data`` (a ``datasets.DataBundle``).
    ``state`` is a dict the method may fill; it is checkpointed and restored on resume.
    """

    def __init__(self, args: argparse.Namespace, method: str, networks: dict[str, str],
                 recipe_variant: str | None = None):
        self.args, self.method = args, method
        self.start_time = time.perf_counter()
        self._init_distributed(args)
        self.main = self.rank == 0
        if args.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True
        seed_everything(args.seed)

        self.data = self._build_data(args)
        self.recipes = {role: recipe_for(args.recipe, args.dataset, role, recipe_variant)
                        for role in networks}
        first = next(iter(self.recipes.values()))
        self.num_epochs = args.epochs or first.epochs
        batch_size = args.batch_size or first.batch_size
        if batch_size % self.world_size:
            raise UsageError(f"--batch-size {batch_size} is not divisible by {self.world_size} processes")
        loader = args.loader
        if loader == "auto":
            loader = "tensor" if self.data.train_arrays is not None else "torch"
        try:
            self.train_loader, self.test_loader = datasets.make_loaders(
                self.data, batch_size // self.world_size, args.test_batch_size or first.test_batch_size,
                loader=loader, device=self.device, workers=args.workers, seed=args.seed,
                rank=self.rank, world_size=self.world_size)
        except ValueError as e:
            raise UsageError(str(e)) from None

        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.architectures = dict(networks)
        self.modules, self.nets, self.optimizers, self.schedulers = {}, {}, {}, {}
        for role, name in networks.items():
            self._build_network(role, name)

        self.state: dict = {}
        self.epoch = 0
        self.best = {role: {"top1": -1.0, "epoch": 0} for role in networks}
        self.history: list[dict] = []
        self.dir = Path(args.out) / method / (args.run_name or self._default_run_name(networks))
        self._prepare_directory()
        self._epoch_sums: dict = {}
        self._epoch_count = 0
        self.global_step = self.epoch * len(self.train_loader)
        self.writer = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(self.dir / "tensorboard", purge_step=self.global_step or None)

    # ------------------------------------------------------------------ construction
    def _init_distributed(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = choose_device(args.device)
        if args.sync_bn and self.world_size > 1 and self.device.type != "cuda":
            raise UsageError(f"--sync-bn needs CUDA devices; SyncBatchNorm cannot run on {self.device.type}")
        self._owns_process_group = self.world_size > 1 and not dist.is_initialized()
        if self._owns_process_group:
            if self.device.type == "cuda":
                local_rank = int(os.environ.get("LOCAL_RANK", "0"))
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _build_data(self, args):
        """The dataset; the main process downloads it (if allowed) while the others wait."""
        download = args.download or args.dataset in DOWNLOAD_ON_FIRST_USE
        for turn in (True, False):
            if self.main == turn:
                data = datasets.build(args.dataset, args.data_root, download=download and self.main,
                                      train_subset=args.train_subset, test_subset=args.test_subset)
            if self.world_size > 1:
                dist.barrier()
        return data

    def _build_network(self, role, name):
        try:
            module = models.build(name, self.data.num_classes, image_size=self.data.image_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
        module = module.to(self.device, memory_format=self.memory_format)
        if self.args.sync_bn and self.world_size > 1:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        net = module
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if self.args.compile:
            net = torch.compile(net, backend=self.args.compile)
        recipe = self.recipes[role]
        optimizer = build_optimizer(module.parameters(), recipe, self.args.lr)
        self.modules[role], self.nets[role], self.optimizers[role] = module, net, optimizer
        self.schedulers[role] = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, scaled_milestones(recipe, self.num_epochs), gamma=recipe.gamma)

    def _default_run_name(self, networks):
        return f"{self.args.dataset}-{'-'.join(networks.values())}-seed{self.args.seed}"

    def _prepare_directory(self):
        last = self.dir / "last.pt"
        if self.args.resume and last.exists():
            self._load(load_checkpoint(last))
        elif last.exists():
            raise UsageError(f"{self.dir} already holds a run; pass --resume to continue it "
                             "or --run-name to start another")
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.dir / "metrics.jsonl",  # drops rows of an epoch whose checkpoint was lost
                         lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history)))
            save_json(self.dir / "args.json", vars(self.args))

    # ------------------------------------------------------------------ the loop
    def epochs(self):
        """Epoch numbers still to run (1-based), continuing after a resume."""
        return range(self.epoch + 1, self.num_epochs + 1)

    def train_batches(self):
        """This epoch's training batches on the device, with a progress bar."""
        epoch = self.epoch + 1
        for net in self.nets.values():
            net.train()
        self.train_loader.set_epoch(epoch)
        from tqdm import tqdm
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.num_epochs}", leave=False,
                   disable=self.args.no_progress or not self.main or not sys.stderr.isatty())
        self._bar = bar
        for images, targets in bar:
            yield images.contiguous(memory_format=self.memory_format), targets
            self.global_step += 1

    def autocast(self):
        """Autocast context for forward passes (a no-op without ``--amp``)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the GradScaler under fp16."""
        self.scaler.scale(loss).backward()

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """Step the given optimisers only (and the GradScaler once)."""
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of ``values`` over every process (identity for one process)."""
        if self.world_size > 1:
            values = values.detach().clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def log_iteration(self, scalars: dict) -> None:
        """Record one iteration's scalars: TensorBoard every ``--log-interval``, epoch means always."""
        scalars = {k: v.detach() if torch.is_tensor(v) else v for k, v in scalars.items()}
        for key, value in scalars.items():
            self._epoch_sums[key] = self._epoch_sums.get(key, 0.0) + value
        self._epoch_count += 1
        if self.writer is not None and self.global_step % self.args.log_interval == 0:
            for key, value in scalars.items():
                self.writer.add_scalar(f"iter/{key}", float(value), self.global_step)

    def end_epoch(self, extra: dict | None = None) -> dict:
        """Step the schedules, evaluate every network, log, keep the best, write ``last.pt``.

        ``extra`` holds the method's per-epoch values. Returns the epoch's metrics row. Under
        DDP the training means are averaged over processes and every process takes rank 0's
        BatchNorm statistics (those ``last.pt`` holds) before the evaluation.
        """
        self.epoch += 1
        row = {"epoch": self.epoch}
        for role, optimizer in self.optimizers.items():
            row[f"lr/{role}"] = optimizer.param_groups[0]["lr"]
            self.schedulers[role].step()
        n = max(self._epoch_count, 1)
        keys = list(self._epoch_sums)
        means = self.all_reduce_mean(torch.tensor([float(self._epoch_sums[k]) / n for k in keys],
                                                  dtype=torch.float64, device=self.device))
        row.update({f"train/{k}": v for k, v in zip(keys, means.tolist())})
        self._epoch_sums, self._epoch_count = {}, 0
        row.update(extra or {})
        self._broadcast_buffers()
        for role, net in self.nets.items():
            metrics = evaluate(net, self.test_loader, self.autocast)
            row.update({f"test/{role}/{k}": v for k, v in metrics.items()})
            if metrics["top1"] > self.best[role]["top1"]:
                self.best[role] = {"top1": metrics["top1"], "epoch": self.epoch}
                if self.main:
                    save_torch(self.dir / f"best_{role}.pt", self._network_checkpoint(role, metrics))
        row["time/elapsed_s"] = self.elapsed()
        self.history.append(row)
        if self.main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, self.epoch)
            self.writer.flush()
            save_torch(self.dir / "last.pt", self._checkpoint())
            summary = "  ".join(f"{role} {row[f'test/{role}/top1']:.2f}%" for role in self.nets)
            print(f"epoch {self.epoch}/{self.num_epochs}  {summary}", flush=True)
        return row

    def finish(self, extra: dict | None = None) -> dict:
        """Write ``results.json`` (atomically) and close the logs; returns the results."""
        last = self.history[-1] if self.history else {}
        results = {
            "method": self.method,
            "dataset": self.args.dataset,
            "recipe": self.args.recipe,
            "seed": self.args.seed,
            "epochs": self.epoch,
            "epochs_planned": self.num_epochs,
            "world_size": self.world_size,
            "wall_time_s": self.elapsed(),
            "networks": {
                role: {
                    "arch": self.architectures[role],
                    "params": models.count_parameters(self.modules[role]),
                    "best_top1": self.best[role]["top1"],
                    "best_epoch": self.best[role]["epoch"],
                    "final_top1": last.get(f"test/{role}/top1"),
                    "final_top5": last.get(f"test/{role}/top5"),
                    "final_loss": last.get(f"test/{role}/loss"),
                } for role in self.nets},
            **(extra or {}),
            "args": vars(self.args),
        }
        if self.main:
            save_json(self.dir / "results.json", results)
            self.writer.close()
        if dist.is_initialized():
            dist.barrier()
        if self._owns_process_group:
            dist.destroy_process_group()
        return results

    def elapsed(self) -> float:
        """Wall time of this run in seconds, resumed parts included."""
        return self.state.get("_elapsed_before", 0.0) + time.perf_counter() - self.start_time

    def _broadcast_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every process.

        DDP broadcasts them only as a training forward pass starts, so after one each
        process holds the statistics of its own batches.
        """
        if self.world_size > 1:
            for module in self.modules.values():
                for buffer in module.buffers():
                    dist.broadcast(buffer, 0)

    def synchronize(self) -> None:
        """Wait for the device, so host timers measure its work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ checkpoints
    def _network_checkpoint(self, role, metrics):
        return {"arch": self.architectures[role], "num_classes": self.data.num_classes,
                "image_size": self.data.image_size, "dataset": self.args.dataset,
                "epoch": self.epoch, "metrics": metrics, "model": self.modules[role].state_dict()}

    def _checkpoint(self):
        return {
            "epoch": self.epoch,
            "models": {r: m.state_dict() for r, m in self.modules.items()},
            "optimizers": {r: o.state_dict() for r, o in self.optimizers.items()},
            "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "best": self.best,
            "history": self.history,
            "state": {**self.state, "_elapsed_before": self.elapsed()},
            "rng": rng_state(),
            "networks": {r: self.architectures[r] for r in self.modules},
        }

    def _load(self, ckpt):
        try:
            for role, module in self.modules.items():
                module.load_state_dict(ckpt["models"][role])
                self.optimizers[role].load_state_dict(ckpt["optimizers"][role])
                self.schedulers[role].load_state_dict(ckpt["schedulers"][role])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.epoch, self.best, self.history = ckpt["epoch"], ckpt["best"], ckpt["history"]
            self.state = ckpt["state"]
            set_rng_state(ckpt["rng"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UsageError(f"checkpoint {self.dir / 'last.pt'} does not match this run "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None

"""Intermediate features of any network of the zoo, for feature distillation.

FitNet (Romero et al., ICLR 2015) regresses a student's *guided layer* onto a teacher's
*hint layer*, AT (Zagoruyko & Komodakis, ICLR 2017) matches the attention maps of the
stage outputs, and CRD (Tian et al., ICLR 2020) contrasts the *embeddings*. The names:

* ``stage1 .. stageN`` - the output of each stage, a stage being the run of blocks at one
  spatial resolution: stage k ends where the next down-sampling begins;
* ``pre_pool`` - the last 4-D map, the one the classifier pools (usually stageN itself);
* ``embedding`` - the input of the final ``nn.Linear`` (the pooled, flattened vector; after
  the classifier's dropout where it has one, e.g. torchvision's MobileNetV2 while training).

Use::

    extractor = FeatureExtractor(run.nets["student"], run.data.image_size, ["stage2", "embedding"])
    logits, feats = extractor(images)      # the network's own forward; feats["stage2"]: (N, C, H, W)
    find_features(model, 32)               # {name: Feature(module, call, hook, shape)}
    match_stages(find_features(teacher, 32), find_features(student, 32))   # [("stage1", "stage2"), ...]

**Stages without a table of module names.** ``find_features`` runs the network once on
one zero image (eval mode, no_grad; every module's training flag is restored, so
BatchNorm statistics do not move and no random numbers are drawn) and records every
module call. The *trunk* is the sequence of 4-D module outputs, each at least as large
as every later one (a squeeze-excitation branch pools to 1x1 and comes back: not trunk).
Resolution r ends at the input of its *down-sampling unit*: the outermost module call
that starts after the first trunk map at r, encloses the first trunk map below r and
outputs the next resolution (the first block of the next stage, a max-pool, a DenseNet
transition, the global pool). The feature is read from the outermost module that
produced that input (from the unit's input when a functional op did), or from the last
trunk map when no unit follows. A resolution is a stage when a convolution runs at it
before its unit, with one fallback rule: the first resolution is a *stem*, not a stage,
when it is below the input's and holds a single convolution (the stride-2 conv-BN-ReLU
before the max-pool of an ImageNet ResNet, DenseNet or ShuffleNet, MobileNetV3's stem
conv). ``pre_pool`` ends the last resolution but a conv-free 1x1 (the pooled output): it
is stageN unless conv-free layers follow the last convolution at a new size (a VGG whose
last max-pool comes before the global pool).

**The last stage ends at its last block, pre_pool after the head.** A *block* is a module
call with an output map of the stage's size and at least two convolutions at that size
inside it (a residual or inverted-residual block, a dense block, a stage's Sequential); a
container that runs any module after its own last block is not one. stageN is the output
of the last block at its resolution when at most one convolution at that size follows it,
so that layers after it that belong to no block (the network's head) are left out, as the
CRD benchmark's code (RepDistiller's ``models/``) reads the features its FitNet and AT use: a WRN's (pre-activation) last
stage is its last group's sum, before the final BN-ReLU (RepDistiller's ``f3``; stages
1..N-1 are group sums too), a DenseNet's its last dense block's output, before the final
BN-ReLU, a MobileNetV2's its last inverted residual's output, before the 1x1 head
convolution (``f4``). In post-activation networks (ResNets, MobileNet) the last block's
output is the last map itself, and where the last convolutions belong to no block (a VGG's
plain conv-BN-ReLU layers) stageN stays the last map. pre_pool is the map the classifier
pools: after the head, e.g. a WRN's final BN-ReLU.

**Forward hooks, not FX.** ``torchvision.models.feature_extraction.create_feature_extractor``
builds a second module (a GraphModule sharing the parameters). The network the optimiser
trains is run through its DistributedDataParallel wrapper, whose forward and backward
broadcast buffers and all-reduce the gradients, and through torch.compile's wrapper:
an FX copy bypasses both (no gradient sync, a second compilation), or needs its own DDP
over the same parameters. FX also cannot trace data-dependent Python control flow, and
it bakes ``self.training`` branches in (torchvision traces a train and an eval graph).
Hooks on the wrapped module's submodules fire inside the wrapper's own forward: the
features are tensors of that very forward, in its autograd graph (a loss on them
reaches the parameters and DDP's reducer), under no_grad they carry no graph, nothing
is copied or re-traced, and torch.compile traces the hooks into its graph. The hooks
store only while the extractor calls the network, so other forwards (evaluation) keep
nothing. The costs: dynamo does not guard on hooks, so the extractor must exist before
a compiled network first runs (a missed feature raises; it is never silently stale);
whether the hooks store is a guarded flag, so a compiled network keeps a graph for
each; a feature the network later modifies in place is seen modified.

**dtype and memory format.** A feature is the network's own tensor: under autocast it has
the dtype of the op that produced it (bf16/fp16 for convolution outputs; cast with
``.float()`` in the loss), and a channels_last network gives channels_last maps.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Feature:
    """Where a feature is read and its shape: the ``hook`` ("output" or "input") of call
    number ``call`` of the submodule named ``module`` ("" is the network itself); ``shape``
    excludes the batch axis: (C, H, W) for maps, (D,) for the embedding."""

    module: str
    call: int
    hook: str
    shape: tuple[int, ...]


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel, DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            net = net._orig_mod
        else:
            return net


@dataclasses.dataclass(eq=False)
class _Call:
    name: str
    module: nn.Module
    index: int
    start: int
    input: object
    end: int = -1
    output: object = None


def _record_calls(module: nn.Module, x: torch.Tensor):
    """``module(x)`` and every module call of it, in order of completion."""
    clock, calls, running, counts = itertools.count(), [], {}, {}

    def pre(name, m, args):
        index = counts[name] = counts.get(name, -1) + 1
        running.setdefault(name, []).append(_Call(name, m, index, next(clock), args[0] if args else None))

    def post(name, m, args, out):
        call = running[name].pop()
        call.end, call.output = next(clock), out
        calls.append(call)

    handles = []
    for name, m in module.named_modules():
        handles += [m.register_forward_pre_hook(functools.partial(pre, name)),
                    m.register_forward_hook(functools.partial(post, name))]
    try:
        return module(x), calls
    finally:
        for handle in handles:
            handle.remove()


def _size(t) -> tuple[int, int] | None:
    """(H, W) of a 4-D map of the probe (batch 1), else None."""
    return tuple(t.shape[2:]) if isinstance(t, torch.Tensor) and t.dim() == 4 and len(t) == 1 else None


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def _resolution_ends(calls: list[_Call]) -> dict[tuple[int, int], tuple[Feature, int]]:
    """For each trunk resolution, in order: where it ends and how many convolutions run at it."""
    maps = [c for c in calls if _size(c.output)]
    trunk, largest = [], 0
    for call in reversed(maps):
        if _area(_size(call.output)) >= largest:
            trunk.append(call)
            largest = _area(_size(call.output))
    trunk.reverse()
    sizes = list(dict.fromkeys(_size(c.output) for c in trunk))
    ends = {}
    for i, size in enumerate(sizes):
        at_size = [c for c in trunk if _size(c.output) == size]
        unit = None
        if i + 1 < len(sizes):
            lower = next(c for c in trunk if _size(c.output) == sizes[i + 1])
            unit = min((c for c in calls if at_size[0].end < c.start <= lower.start and c.end >= lower.end
                        and _size(c.output) == sizes[i + 1]), key=lambda c: c.start, default=None)
        before = [c for c in at_size if unit is None or c.end < unit.start]
        if unit is not None and _size(unit.input) == size:
            producers = [c for c in calls if c.output is unit.input and c.end < unit.start]
            end = max(producers, key=lambda c: c.end, default=None)
            feature = (Feature(end.name, end.index, "output", tuple(end.output.shape[1:])) if end else
                       Feature(unit.name, unit.index, "input", tuple(unit.input.shape[1:])))
        else:
            feature = Feature(before[-1].name, before[-1].index, "output", tuple(before[-1].output.shape[1:]))
        ends[size] = feature, sum(isinstance(c.module, nn.modules.conv._ConvNd) for c in before)
    return ends


def _inside(inner: _Call, outer: _Call) -> bool:
    return outer.start < inner.start and inner.end < outer.end


def _last_block(calls: list[_Call], size: tuple[int, int]) -> _Call | None:
    """The last block at resolution ``size`` if at most one convolution at that size follows it
    (see the module docstring), else None."""
    convs = [c for c in calls if isinstance(c.module, nn.modules.conv._ConvNd) and _size(c.output) == size]
    blocks = [c for c in calls if _size(c.output) == size and sum(_inside(v, c) for v in convs) >= 2]

    def has_head(c):  # a module runs inside c after c's own last block
        inner = max((b.end for b in blocks if _inside(b, c)), default=None)
        return inner is not None and any(inner < x.start and x.end < c.end for x in calls)
    last = max((c for c in blocks if not has_head(c)), key=lambda c: c.end, default=None)
    return last if last is not None and sum(v.start > last.end for v in convs) <= 1 else None


def find_features(net: nn.Module, image_size: int) -> dict[str, Feature]:
    """``{"stage1": Feature, ..., "pre_pool": ..., "embedding": ...}`` of ``net`` (wrappers
    allowed) for (3, image_size, image_size) inputs, found by one probe forward pass (see the
    module docstring). ``embedding`` is absent when no ``nn.Linear`` gives the output."""
    module = unwrap(net)
    reference = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    x = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            logits, calls = _record_calls(module, x)
    finally:
        for m, mode in training.items():
            m.training = mode

    ends = _resolution_ends(calls)
    sizes = list(ends)
    features, last_size = {}, None
    for i, (size, (feature, convs)) in enumerate(ends.items()):
        stem = i == 0 and _area(size) < image_size ** 2 and convs == 1
        if convs and not stem:
            features[f"stage{len(features) + 1}"], last_size = feature, size
    if not features:
        raise ValueError(f"{type(module).__name__} at {image_size} px has no stage: no convolution "
                         "runs below the stem")
    block = _last_block(calls, last_size)
    if block is not None:
        features[f"stage{len(features)}"] = Feature(block.name, block.index, "output",
                                                    tuple(block.output.shape[1:]))
    pooled = len(sizes) > 1 and sizes[-1] == (1, 1) and not ends[sizes[-1]][1]
    features["pre_pool"] = ends[sizes[-2 if pooled else -1]][0]
    linear = [c for c in calls if isinstance(c.module, nn.Linear) and c.output is logits]
    if linear:
        features["embedding"] = Feature(linear[-1].name, linear[-1].index, "input",
                                        tuple(linear[-1].input.shape[1:]))
    return features


class FeatureExtractor:
    """``logits, features = FeatureExtractor(net, image_size, names)(images)``.

    ``net`` is the network as it is run: plain, DDP- or torch.compile-wrapped (build the
    extractor before a compiled network first runs). Calling the extractor calls ``net``
    once and returns its output and ``{name: tensor}`` of that forward, for ``names``
    (default: every name of ``find_features``). The hooks stay on the wrapped module
    (storing only during these calls) until ``remove()``.
    """

    def __init__(self, net: nn.Module, image_size: int, names=None):
        self.net = net
        module = unwrap(net)
        self.available = find_features(module, image_size)
        self.names = list(self.available if names is None else names)
        unknown = [n for n in self.names if n not in self.available]
        if unknown:
            raise KeyError(f"{type(module).__name__} has no feature {', '.join(unknown)}; "
                           f"it has {', '.join(self.available)}")
        self._storing = False
        self._seen: dict[tuple[str, str], list] = {}
        self._handles = []
        for name in self.names:
            f = self.available[name]
            if (f.module, f.hook) in self._seen:
                continue
            seen = self._seen[f.module, f.hook] = []
            submodule = module.get_submodule(f.module)
            if f.hook == "output":
                self._handles.append(submodule.register_forward_hook(
                    lambda m, args, out, seen=seen: self._store(seen, out)))
            else:
                self._handles.append(submodule.register_forward_pre_hook(
                    lambda m, args, seen=seen: self._store(seen, args[0])))

    def _store(self, seen: list, tensor: torch.Tensor) -> None:
        if self._storing:
            seen.append(tensor)

    def __call__(self, *args, **kwargs):
        for seen in self._seen.values():
            seen.clear()
        self._storing = True
        try:
            output = self.net(*args, **kwargs)
        finally:
            self._storing = False
        features = {}
        for name in self.names:
            f = self.available[name]
            seen = self._seen[f.module, f.hook]
            if len(seen) <= f.call:
                raise RuntimeError(
                    f"feature {name!r} ({f.hook} of {f.module or 'the network'}) was not captured; a "
                    "torch.compile'd network must not run before its FeatureExtractor is built")
            features[name] = seen[f.call]
        for seen in self._seen.values():
            seen.clear()
        return output, features

    def remove(self) -> None:
        """Take the hooks off the network."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def match_stages(teacher: dict, student: dict, stages=None) -> list[tuple[str, str]]:
    """Pair teacher and student stages of equal spatial size: FitNet's hint and guided
    layers, AT's attention-map pairs.

    ``teacher`` and ``student`` map names to a ``Feature`` or a shape ending in (H, W), e.g.
    ``find_features(net, image_size)``; only ``stageK`` entries count. ``stages`` are the
    student's stages that must be paired (default: every student stage with a partner).
    Each network has one stage per resolution, so a pair is unique. Returns
    ``[(teacher stage, student stage)]`` in the student's order. Raises ``ValueError``,
    listing both networks' stage sizes, when a requested stage has no partner or no
    stage pairs at all.
    """
    def by_size(feats):
        return {tuple(getattr(v, "shape", v)[-2:]): name
                for name, v in feats.items() if re.fullmatch(r"stage\d+", name)}

    t_sizes, s_sizes = by_size(teacher), by_size(student)
    s_names = {name: size for size, name in s_sizes.items()}
    wanted = [n for n, size in s_names.items() if size in t_sizes] if stages is None else list(stages)

    def listing(sizes):
        return ", ".join(f"{name} {h}x{w}" for (h, w), name in sizes.items())

    missing = [n for n in wanted if s_names.get(n) not in t_sizes]
    if missing or not wanted:
        raise ValueError(f"no teacher stage of the same size for student {', '.join(missing) or 'stages'}; "
                         f"teacher: {listing(t_sizes)}; student: {listing(s_sizes)}")
    return [(t_sizes[s_names[n]], n) for n in wanted]

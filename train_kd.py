"""Offline distillation from a fixed, pretrained teacher: KD, FitNet, AT, CRD and RCO.

The offline methods of Table 5 of the SwitOKD paper ("seen as expert mode of SwitOKD"),
one ``--distill`` each; every run writes to ``<--out>/<method>/<run-name>/`` and records
``method`` = kd / fitnet / at / crd / rco in its ``results.json``:

* ``kd``: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).
  Table 1's loss of the SwitOKD paper, ``alpha CE(y, p_s) + (1 - alpha) tau^2 KL(p_t^tau || p_s^tau)``;
  ``--kd-form okddip``: the OKDDip release's classic KD, ``CE + tau^2 KL`` with its KL
  (docs/OKDDIP.md; e.g. ``--recipe okddip --student resnet32`` from a ``resnet110`` teacher
  trained by ``train_vanilla.py --recipe okddip``, as that release's README runs it).
* ``fitnet``: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015). A teacher
  stage (the *hint*) regressed from the student stage of the same size (the *guided*
  layer) through a learned regressor, MSE: ``CE + beta MSE(r(v_g), u_h)``.
* ``at``: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).
  Attention maps (p = 2, l2-normalised) matched at every stage boundary the two networks
  share: ``CE + beta sum_j mean (Q_S^j - Q_T^j)^2``.
* ``crd``: Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020).
  Embedding heads on both penultimate features, a memory of every training sample's
  embeddings (momentum-updated), K negatives of other classes per sample, NCE:
  ``CE + beta (L_NCE^S + L_NCE^T)``.
* ``rco``: Jin et al., "Knowledge Distillation via Route Constrained Optimization" (ICCV
  2019). KD from one anchor after another, the anchors being checkpoints of the teacher's
  own training route (``train_vanilla.py --keep-route K``), by equal epoch intervals.

FitNet, AT and CRD follow the CRD benchmark's implementation (RepDistiller) in their loss
form and default weights; every difference from the papers and every choice of ours is
in docs/BASELINES.md. Example (a teacher trained by train_vanilla.py first)::

    python train_vanilla.py --dataset digits --model wrn_16_2 --role teacher --epochs 15 --keep-route 4 \\
        --out runs --run-name teacher
    python train_kd.py --dataset digits --student resnet20 --teacher-ckpt runs/vanilla/teacher --epochs 15 \\
        --distill crd --nce-k 1024

``--teacher-ckpt`` takes a run directory (its ``best_teacher.pt``, or its only
``best_<role>.pt``, ...: ``models.checkpoint_file``) or a checkpoint file; RCO takes the
run directory and reads its route (``models.route_checkpoints``).
"""
import utils  # first: Ctrl-C during the slow imports then ends quietly

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import datasets
import models
from distill import kl_loss, okddip_kl

METHODS = {
    "kd": "KD (Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, 2015)",
    "fitnet": "FitNet (Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015)",
    "at": "AT (Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017)",
    "crd": "CRD (Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020)",
    "rco": "RCO (Jin et al., Knowledge Distillation via Route Constrained Optimization, ICCV 2019)",
}
BETA = {"fitnet": 100.0, "at": 1000.0, "crd": 0.8}
"""The weight of each feature method's term: the CRD benchmark's (RepDistiller's run_cifar_distill.sh)."""
REGRESSORS = ("conv-bn-relu", "conv-bn", "conv")
KD_FORMS = ("table1", "okddip")


# =========================================================================== KD (Hinton et al., 2015)

def kd_loss(student_logits, teacher_logits, targets, alpha=0.1, tau=3.0):
    """L = alpha CE(y, p_s^1) + (1 - alpha) tau^2 KL(p_t^tau || p_s^tau): SwitOKD Table 1 (KD row).

    Hinton et al. (2015): probabilities from the tempered softmax exp(z_i/T) / sum_j exp(z_j/T)
    (Sec. 2, Eq. 1), for the teacher's soft targets and the student alike; the soft term's
    gradient per student logit is (1/T)(q_i - p_i), q the student's and p the teacher's
    tempered probabilities (Sec. 2.1, Eq. 2), so it scales as 1/T^2 and is multiplied by T^2
    (Sec. 2) to stay comparable across temperatures (all verified, docs/BASELINES.md).
    Returns (total, CE term, KL term before its weight).
    """
    ce = F.cross_entropy(student_logits, targets)
    kl = kl_loss(teacher_logits, student_logits, tau)
    return alpha * ce + (1 - alpha) * kl, ce, kl


def okddip_kd_loss(student_logits, teacher_logits, targets, tau=3.0):
    """L = CE(y, p_s^1) + tau^2 KL(p_t^tau + 1e-7 || p_s^tau): the OKDDip release's classic KD.

    Its ``train_kd.py:86-93`` (docs/OKDDIP.md R2.5): CE weight 1, the soft
    term weight alpha = 1, T = 3, no ramp-up, the release's KL (``distill.okddip_kl``; the
    teacher is frozen, so nothing flows back into it). Returns (total, CE term, KL term).
    """
    ce = F.cross_entropy(student_logits, targets)
    kl = okddip_kl(teacher_logits.detach(), student_logits, tau)
    return ce + kl, ce, kl


# =========================================================================== FitNet (Romero et al., 2015)

class HintRegressor(nn.Sequential):
    """FitNet's regressor r: the student's guided-layer map (C_s, H_s, W_s) -> the teacher's hint shape.

    Romero et al. (2015), hint-based training (Sec. 2, 2.2 as we recall it): a convolutional
    regressor whose kernel is N_g - N_h + 1 (so the spatial size shrinks to the hint's;
    corroborated), with the hint layer's non-linearity (unverified; docs/BASELINES.md). As
    RepDistiller's ``ConvReg`` (models/util.py): H_s = 2 H_t: 3x3 stride-2 conv; 2 H_s = H_t:
    4x4 stride-2 transposed conv; H_s >= H_t: the (1 + H_s - H_t) x (1 + W_s - W_t) conv
    (1x1 for equal sizes); then BatchNorm and ReLU (``conv-bn-relu``, RepDistiller's), or
    without the ReLU (``conv-bn``), or the convolution alone (``conv``, the paper's for a
    linear hint layer such as a pre-activation residual sum).
    """

    def __init__(self, student_shape, teacher_shape, kind="conv-bn-relu"):
        (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shape, teacher_shape
        if kind not in REGRESSORS:
            raise ValueError(f"unknown regressor {kind!r}; choose from {', '.join(REGRESSORS)}")
        if (h_s, w_s) == (2 * h_t, 2 * w_t):
            conv = nn.Conv2d(c_s, c_t, 3, stride=2, padding=1)
        elif (2 * h_s, 2 * w_s) == (h_t, w_t):
            conv = nn.ConvTranspose2d(c_s, c_t, 4, stride=2, padding=1)
        elif h_s >= h_t and w_s >= w_t:
            conv = nn.Conv2d(c_s, c_t, (1 + h_s - h_t, 1 + w_s - w_t))
        else:
            raise ValueError(f"no regressor from a {h_s}x{w_s} guided layer to a {h_t}x{w_t} hint "
                             "(it must be at least as large, or half its size)")
        layers = [conv] + ([nn.BatchNorm2d(c_t)] if kind != "conv" else []) + \
                 ([nn.ReLU(inplace=True)] if kind == "conv-bn-relu" else [])
        super().__init__(*layers)


def hint_loss(regressed, hint):
    """FitNet's hint loss, Romero et al. (2015), Sec. 2: L_HT = 1/2 ||u_h(x) - r(v_g(x))||^2.

    As the CRD benchmark computes it (RepDistiller ``HintLoss`` = ``nn.MSELoss()``): the
    squared difference averaged over all B x C x H x W elements, so its gradient with respect
    to r(v_g) is 2 (r - u_h) / numel, L_HT's (r - u_h) scaled by 2 / numel (absorbed by
    beta). The hint is detached (the teacher is fixed). The form of L_HT is corroborated; its
    number, Eq. (3) as we recall it, is unverified (docs/BASELINES.md).
    """
    return F.mse_loss(regressed, hint.detach())


# =========================================================================== AT (Zagoruyko & Komodakis, 2017)

def attention_map(feature, p=2.0):
    """Q = vec(F(A)) / ||vec(F(A))||_2 with F(A) = mean_i |A_i|^p: Zagoruyko & Komodakis (2017).

    Activation-based attention (Sec. 3.1 as we recall it; the mapping F is Eq. 1, verified).
    The paper's F^p_sum(A) = sum_i |A_i|^p over the C channels of A (N, C, H, W); the mean
    (both reference codes') is the sum / C, which the l2 normalisation (per sample, over the
    H x W positions, eps 1e-12) removes. Returns (N, H * W).
    """
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student_feature, teacher_feature, p=2.0):
    """One pair's term of Zagoruyko & Komodakis (2017)'s AT loss, as both reference codes compute it.

    The paper's term (Eq. 2: corroborated, not read in the paper; docs/BASELINES.md):
    beta/2 || Q_S / ||Q_S||_2 - Q_T / ||Q_T||_2 ||_p; the official code (and RepDistiller's
    ``Attention``) take the squared difference of the normalised maps averaged over the batch
    and the H x W positions, with no 1/2: mean (Q_S - Q_T)^2, weighted by beta = 1000 and summed
    over the pairs. The teacher's map is detached.
    """
    return (attention_map(student_feature, p) - attention_map(teacher_feature.detach(), p)).pow(2).mean()


# =========================================================================== CRD (Tian et al., 2020)

def crd_embedding(linear, feature):
    """g(h) = W h + b, l2-normalised: CRD's embedding heads g^S, g^T (Tian et al., 2020, Sec. 3,
    corroborated; RepDistiller ``Embed``: Linear then x / ||x||_2) on the flattened penultimate feature."""
    return F.normalize(linear(feature.flatten(1)), dim=1)


class CRDHeads(nn.Module):
    """CRD's trained heads and its memory: ``embed_s``, ``embed_t`` (both trained), ``memory_s`` and
    ``memory_t`` (N x D embeddings of every training sample, uniform in +-1/sqrt(D/3) at first, as
    RepDistiller's ``ContrastMemory``), and ``z`` = (Z_S, Z_T), the normalisation constants (-1: not
    set yet). Buffers, so ``last.pt`` holds them and a resumed run continues exactly.
    ``forward(f_s, f_t)`` gives the two embeddings."""

    def __init__(self, student_dim, teacher_dim, feat_dim, n_data):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(student_dim, feat_dim), nn.Linear(teacher_dim, feat_dim)
        stdv = 1 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))

    def forward(self, student_feature, teacher_feature):
        return crd_embedding(self.embed_s, student_feature), crd_embedding(self.embed_t, teacher_feature)


def contrast_scores(anchor, memory, sample_idx, tau=0.07):
    """exp(<m_j, v> / tau) for the rows j = ``sample_idx`` (B, 1 + K) of ``memory``: CRD's critic
    before its normalisation (Tian et al., 2020, Sec. 3, corroborated: h = exp(g_T(t)'g_S(s)/tau) / (... + N/M)).
    The memory rows are detached: the gradient reaches the anchor embeddings ``v`` (B, D) only."""
    rows = memory[sample_idx].detach()                                   # (B, 1 + K, D)
    return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / tau)


def nce_loss(scores, n_data, eps=1e-7):
    """CRD's NCE loss of one side (Tian et al., 2020; "Eq (18)" by RepDistiller's ``ContrastLoss``, unverified).

    ``scores`` (B, 1 + K): the normalised critic values P of the positive (column 0) and the
    K negatives; the noise is uniform, P_n = 1 / N. With h(P) = P / (P + K P_n):
    L = -(1/B) sum_b [log h(P_b0) + sum_k log(1 - h(P_bk))], summed over the negatives and
    averaged over the batch (eps 1e-7 in both denominators, as RepDistiller).
    """
    k = scores.size(1) - 1
    noise = k / n_data
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / scores.size(0)


def crd_loss(v_s, v_t, heads, sample_idx, tau=0.07):
    """L_CRD = L_NCE(student anchor, teacher memory) + L_NCE(teacher anchor, student memory).

    Tian et al. (2020), with the reference code's two symmetric parts (RepDistiller
    ``CRDLoss``). The scores are divided by the constants Z = mean(scores) N of the first
    batch ever seen (averaged over processes), then kept: RepDistiller's ``ContrastMemory``.
    Returns the loss; :func:`update_memory` comes after it.
    """
    n_data = heads.memory_s.size(0)
    student_side = contrast_scores(v_s, heads.memory_t, sample_idx, tau)
    teacher_side = contrast_scores(v_t, heads.memory_s, sample_idx, tau)
    if not getattr(heads, "_z_ready", False):
        if bool((heads.z < 0).any()):
            with torch.no_grad():
                means = torch.stack([student_side.mean(), teacher_side.mean()])
                heads.z.copy_(utils.all_reduce_mean(means) * n_data)
        heads._z_ready = True
    return nce_loss(student_side / heads.z[0], n_data) + nce_loss(teacher_side / heads.z[1], n_data)


@torch.no_grad()
def update_memory(memory, indices, embeddings, momentum=0.5):
    """m_i <- normalise(momentum m_i + (1 - momentum) v_i) at the batch's own rows i (RepDistiller
    ``ContrastMemory``: CRD's momentum-updated memory of embeddings). In place."""
    rows = memory[indices] * momentum + embeddings.detach() * (1 - momentum)
    memory.index_copy_(0, indices, F.normalize(rows, dim=1, eps=0.0))


def gather(tensor):
    """``tensor`` of every process, concatenated along dim 0 (the tensor itself with one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# =========================================================================== RCO (Jin et al., 2019)

def anchor_schedule(num_anchors, epochs, switch_epochs=None):
    """The anchor (0-based, in route order) that each student epoch 1..``epochs`` learns from.

    Jin et al. (2019) supervise the student with anchor points from the teacher's training
    route, easy to hard (verified: abstract, Sec. 1); that they are learnt one after another,
    the converged teacher last, is unverified, as are the paper's anchor count and epoch split
    (docs/BASELINES.md). By default the student's epochs are split equally (our reading of the
    equal epoch interval strategy, a name itself unverified): anchor a takes over after epoch
    floor(a E / A). ``switch_epochs`` (A - 1 increasing epochs) sets the last epoch of each
    anchor but the last instead.
    """
    if switch_epochs is None:
        switch_epochs = [a * epochs // num_anchors for a in range(1, num_anchors)]
    if len(switch_epochs) != num_anchors - 1 or list(switch_epochs) != sorted(set(switch_epochs)) \
            or any(not 0 <= s < epochs for s in switch_epochs):
        raise ValueError(f"{num_anchors} anchors need {num_anchors - 1} increasing switch epochs below the "
                         f"{epochs} epochs, got {' '.join(map(str, switch_epochs)) or 'none'}")
    return [sum(e > s for s in switch_epochs) for e in range(1, epochs + 1)]


# =========================================================================== the teacher

def load_teacher(path, data, device="cpu", memory_format=torch.contiguous_format):
    """The fixed teacher for ``data``: built, loaded, on ``device``, eval mode, no gradients.

    A missing, corrupt or mismatching checkpoint (dataset, classes, image size) raises UsageError.
    """
    try:
        info = models.read_checkpoint(path)
        if info["dataset"] is not None and info["dataset"] != data.name:
            raise ValueError(f"{info['file']} was trained on {info['dataset']}, not {data.name}")
        if ":" in info["arch"] and not info["arch"].startswith("baseline:"):
            raise ValueError(f"{info['file']} holds a multi-branch network ({info['arch']}), not one teacher; "
                             "distil from a single network (train_vanilla.py)")
        teacher = models.load(path, num_classes=data.num_classes, image_size=data.image_size, device=device)
    except ValueError as e:
        raise utils.UsageError(f"--teacher-ckpt: {e}") from None
    return teacher.to(memory_format=memory_format).requires_grad_(False)


def describe_teacher(teacher, run):
    """What results.json records of a teacher: its checkpoint, size and test metrics."""
    metrics = utils.evaluate(teacher, run.test_loader, run.precision.autocast)
    return {**teacher.checkpoint, "params": models.count_parameters(teacher),
            **{f"test_{k}": v for k, v in metrics.items()}}


def route_anchors(path, epochs=None):
    """RCO's anchors: ``{teacher epoch: route checkpoint}`` of the run directory ``path``, by epoch
    (only ``epochs`` when given). UsageError when there is no route or a wanted epoch is missing."""
    try:
        route = models.route_checkpoints(path)
    except ValueError as e:
        raise utils.UsageError(f"--distill rco needs the teacher's run directory as --teacher-ckpt: {e}") from None
    if not route:
        raise utils.UsageError(f"--teacher-ckpt {path} keeps no training route (route_epoch<k>.pt); "
                               "train the teacher with train_vanilla.py --keep-route K or --keep-epochs ...")
    if epochs:
        missing = sorted(set(epochs) - set(route))
        if missing:
            raise utils.UsageError(f"--anchors {' '.join(map(str, missing))}: not in the route of {path} "
                                   f"(it keeps epochs {' '.join(map(str, route))})")
        route = {e: route[e] for e in sorted(set(epochs))}
    return route


# =========================================================================== one iteration

def plain(net):
    """A network as a feature extractor with no features: ``images -> (logits, {})``."""
    return lambda images: (net(images), {})


def train_step(student, teacher, optimizers, images, targets, objective, precision, **batch):
    """One iteration of any method; returns the logged values (device tensors).

    ``student``/``teacher`` map images to ``(logits, {feature name: tensor})`` (a
    ``models.FeatureExtractor``, or :func:`plain`); the teacher runs under no_grad. Both
    forwards run under the run's autocast; ``objective(z_s, z_t, f_s, f_t, targets, **batch)``
    gets them in float32, outside autocast, and returns ``(loss, {name: value})``. Then one
    backward and one step of every optimiser (the student's and its auxiliary modules').
    """
    with precision.autocast():
        z_s, f_s = student(images)
        with torch.no_grad():
            z_t, f_t = teacher(images)
    loss, values = objective(z_s.float(), z_t.float(), {k: v.float() for k, v in f_s.items()},
                             {k: v.float() for k, v in f_t.items()}, targets, **batch)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step(*optimizers)
    return {"loss": loss, **values}


def with_kd(loss, values, z_s, z_t, kd_weight, tau):
    """``loss`` + kd_weight tau^2 KL(p_t^tau || p_s^tau) when kd_weight > 0 (RepDistiller's alpha term)."""
    if kd_weight > 0:
        values["kl"] = kl_loss(z_t, z_s, tau)
        loss = loss + kd_weight * values["kl"]
    return loss, values


# =========================================================================== flags

METHOD_FLAGS = {
    "alpha": ("kd", "rco"), "kd_form": ("kd",), "beta": ("fitnet", "at", "crd"), "kd_weight": ("fitnet", "at", "crd"),
    "hint_layer": ("fitnet",), "guided_layer": ("fitnet",), "regressor": ("fitnet",), "at_p": ("at",),
    "feat_dim": ("crd",), "nce_k": ("crd",), "nce_t": ("crd",), "nce_m": ("crd",), "crd_mode": ("crd",),
    "anchors": ("rco",), "switch_epochs": ("rco",),
}
"""The methods each method-specific flag applies to (given with another method: an error)."""


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.splitlines()[0])
    p.network_argument("--student", default="mobilenetv2_0.5", help="the student network")
    p.network_argument("--teacher-ckpt", required=True, metavar="PATH",
                       help="run directory or checkpoint file of the pretrained teacher (rco: its run directory, "
                            "with its route)")
    g = p.method_group("distillation (docs/BASELINES.md)")
    g.add_argument("--distill", default="kd", choices=tuple(METHODS),
                   help="the method: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    g.add_argument("--alpha", type=utils.number(float, 0, 1), default=0.1,
                   help="kd, rco: weight of the cross-entropy with the labels; the KL term gets 1 - alpha (Table 1)")
    g.add_argument("--kd-form", default="table1", choices=KD_FORMS,
                   help="kd: table1: alpha CE + (1 - alpha) tau^2 KL (SwitOKD's Table 1); okddip: CE + tau^2 KL "
                        "with 1e-7 added to the teacher's probabilities, the OKDDip release's classic KD "
                        "(no --alpha)")
    g.add_argument("--tau", type=utils.POSITIVE,
                   help="distillation temperature of every KL term (default: 4 under --recipe crd, RepDistiller's "
                        "--kd_T; else 3)")
    g.add_argument("--beta", type=utils.NON_NEGATIVE,
                   help="fitnet, at, crd: weight of the method's term beside CE (weight 1) (default: the CRD "
                        "benchmark's, fitnet 100, at 1000, crd 0.8)")
    g.add_argument("--kd-weight", type=utils.NON_NEGATIVE, default=0.0,
                   help="fitnet, at, crd: weight of an added tau^2 KL term (the benchmark's alpha; 0: none, "
                        "1 under --recipe crd: its CRD+KD)")
    g = p.method_group("FitNet")
    g.add_argument("--hint-layer", type=utils.POSITIVE_INT, default=2, metavar="K",
                   help="the teacher's stage K is the hint (RepDistiller's hint_layer: 2, the middle group of a WRN)")
    g.add_argument("--guided-layer", type=utils.POSITIVE_INT, metavar="K",
                   help="the student's stage K is the guided layer (default: the stage of the hint's size)")
    g.add_argument("--regressor", default="conv-bn-relu", choices=REGRESSORS,
                   help="conv-bn-relu: RepDistiller's ConvReg; conv: the paper's linear regressor")
    g = p.method_group("AT")
    g.add_argument("--at-p", type=utils.POSITIVE, default=2.0, help="the power p of the attention map")
    g = p.method_group("CRD")
    g.add_argument("--feat-dim", type=utils.POSITIVE_INT, default=128, help="embedding dimension")
    g.add_argument("--nce-k", type=utils.POSITIVE_INT, default=16384,
                   help="negatives per sample (with replacement when above the other-class samples)")
    g.add_argument("--nce-t", type=utils.POSITIVE, default=0.07, help="temperature of the critic")
    g.add_argument("--nce-m", type=utils.number(float, 0, 1), default=0.5, help="momentum of the memory update")
    g.add_argument("--crd-mode", default="exact", choices=datasets.CONTRAST_MODES,
                   help="exact: the positive is the sample itself; relax: a sample of its class")
    g = p.method_group("RCO")
    g.add_argument("--anchors", type=utils.POSITIVE_INT, nargs="+", metavar="EPOCH",
                   help="the teacher epochs of the route to learn from (default: every one kept)")
    g.add_argument("--switch-epochs", type=utils.POSITIVE_INT, nargs="+", metavar="EPOCH",
                   help="the last student epoch of each anchor but the last (default: equal shares; ours)")
    utils.add_common_flags(p)
    args = utils.parse_args(p, argv)
    for flag, methods in METHOD_FLAGS.items():
        if args.distill not in methods and getattr(args, flag) != args._defaults[flag]:
            raise utils.UsageError(f"--{flag.replace('_', '-')} applies to --distill {' or '.join(methods)}, "
                                   f"not {args.distill}")
    if args.tau is None:  # the recipe's default is a default: not named in the run name
        args.tau = args._defaults["tau"] = 4.0 if args.recipe == "crd" and args.kd_form == "table1" else 3.0
    if args.kd_form == "okddip" and args.alpha != args._defaults["alpha"]:
        raise utils.UsageError("--alpha weighs --kd-form table1; --kd-form okddip weighs CE and KL by 1, "
                               "as the OKDDip release")
    return args


# =========================================================================== training

def stages(features):
    """How many stages ``models.find_features`` found."""
    return sum(name.startswith("stage") for name in features)


def setup_features(args, data, modules, loaded):
    """Load the teacher (on the CPU) into ``loaded`` and build the method's trained auxiliary modules.

    ``Run``'s ``extra_modules`` hook: it runs before the run directory is touched and gets the
    data, which the teacher's checkpoint is checked against. Also records the feature names
    each network must give (``loaded["student_features"]``, ``loaded["teacher_features"]``).
    """
    loaded["student_features"], loaded["teacher_features"] = [], []
    if args.distill == "rco":
        return {}
    teacher = loaded["teacher"] = load_teacher(args.teacher_ckpt, data)
    if args.distill == "kd":
        return {}
    try:
        t_feats = models.find_features(teacher, data.image_size)
        s_feats = models.find_features(modules["student"], data.image_size)
        if args.distill == "fitnet":
            hint = f"stage{args.hint_layer}"
            if hint not in t_feats:
                raise ValueError(f"--hint-layer {args.hint_layer}: the teacher has stages 1..{stages(t_feats)}")
            if args.guided_layer is None:
                guided = models.match_stages({hint: t_feats[hint]}, s_feats)[0][1]
            else:
                guided = f"stage{args.guided_layer}"
                if guided not in s_feats:
                    raise ValueError(f"--guided-layer {args.guided_layer}: the student has stages "
                                     f"1..{stages(s_feats)}")
            loaded.update(pairs=[(hint, guided)], student_features=[guided], teacher_features=[hint])
            return {"regressor": (HintRegressor(s_feats[guided].shape, t_feats[hint].shape, args.regressor),
                                  "student")}
        if args.distill == "at":
            pairs = models.match_stages(t_feats, s_feats)
            loaded.update(pairs=pairs, student_features=[s for _, s in pairs], teacher_features=[t for t, _ in pairs])
            return {}
        # crd
        if "embedding" not in t_feats or "embedding" not in s_feats:
            raise ValueError("CRD needs both networks to end in an nn.Linear classifier (their embedding)")
        loaded.update(student_features=["embedding"], teacher_features=["embedding"])
        heads = CRDHeads(s_feats["embedding"].shape[0], t_feats["embedding"].shape[0], args.feat_dim, len(data.train))
        return {"crd": (heads, "student")}
    except ValueError as e:
        raise utils.UsageError(f"--distill {args.distill}: {e}") from None


def make_objective(args, run, loaded):
    """The method's ``objective(z_s, z_t, f_s, f_t, targets, **batch) -> (loss, logged values)``."""
    beta = args.beta if args.beta is not None else BETA.get(args.distill)
    if args.distill == "kd" and args.kd_form == "okddip":
        def objective(z_s, z_t, f_s, f_t, targets):
            loss, ce, kl = okddip_kd_loss(z_s, z_t, targets, args.tau)
            return loss, {"ce": ce, "kl": kl}
    elif args.distill in ("kd", "rco"):
        def objective(z_s, z_t, f_s, f_t, targets):
            loss, ce, kl = kd_loss(z_s, z_t, targets, args.alpha, args.tau)
            return loss, {"ce": ce, "kl": kl}
    elif args.distill == "fitnet":
        (hint, guided), = loaded["pairs"]
        regressor = run.nets["regressor"]

        def objective(z_s, z_t, f_s, f_t, targets):
            ce = F.cross_entropy(z_s, targets)
            term = hint_loss(regressor(f_s[guided]), f_t[hint])
            return with_kd(ce + beta * term, {"ce": ce, "hint_loss": term}, z_s, z_t, args.kd_weight, args.tau)
    elif args.distill == "at":
        pairs = loaded["pairs"]

        def objective(z_s, z_t, f_s, f_t, targets):
            ce = F.cross_entropy(z_s, targets)
            term = sum(attention_loss(f_s[s], f_t[t], args.at_p) for t, s in pairs)
            return with_kd(ce + beta * term, {"ce": ce, "at_loss": term}, z_s, z_t, args.kd_weight, args.tau)
    else:
        heads, plain_heads = run.nets["crd"], run.modules["crd"]

        def objective(z_s, z_t, f_s, f_t, targets, indices, sample_idx):
            ce = F.cross_entropy(z_s, targets)
            v_s, v_t = heads(f_s["embedding"], f_t["embedding"])
            term = crd_loss(v_s, v_t, plain_heads, sample_idx, args.nce_t)
            every = gather(indices)       # every process updates its memory with every process's batch
            update_memory(plain_heads.memory_s, every, gather(v_s), args.nce_m)
            update_memory(plain_heads.memory_t, every, gather(v_t), args.nce_m)
            return with_kd(ce + beta * term, {"ce": ce, "crd_loss": term}, z_s, z_t, args.kd_weight, args.tau)
    return objective, beta


def summary(args, run, loaded, beta, teacher_info):
    """The method's part of results.json, from flags, modules and ``run.state`` (so a finished run
    resumed after a crash rebuilds it)."""
    common = {"kd_weight": args.kd_weight, "tau": args.tau, "beta": beta}
    if args.distill == "kd":
        method = {"form": args.kd_form, "alpha": args.alpha if args.kd_form == "table1" else 1.0, "tau": args.tau}
    elif args.distill == "fitnet":
        (hint, guided), = loaded["pairs"]
        method = {**common, "hint_layer": hint, "guided_layer": guided, "regressor": args.regressor}
    elif args.distill == "at":
        method = {**common, "p": args.at_p, "pairs": [list(pair) for pair in loaded["pairs"]]}
    elif args.distill == "crd":
        method = {**common, "feat_dim": args.feat_dim, "nce_k": args.nce_k, "nce_t": args.nce_t,
                  "nce_m": args.nce_m, "mode": args.crd_mode, "n_data": len(run.data.train),
                  "z": run.modules["crd"].z.tolist()}
    else:
        anchors = run.state["rco_anchors"]
        method = {"alpha": args.alpha, "tau": args.tau, "anchor_epochs": [a["epoch"] for a in anchors],
                  "switch_epochs": run.state["rco_switch_epochs"], "anchors": anchors}
    return {args.distill: method, "teacher": teacher_info}


def teacher_label(path) -> str:
    """The teacher in a default run name: its run folder (``<run>.<file>`` for a file other than a best_*.pt)."""
    path = Path(path)
    if path.suffix != ".pt":
        return path.name
    return path.parent.name if path.stem.startswith("best_") else f"{path.parent.name}.{path.stem}"


def main(argv=None):
    args = parse_args(argv)
    # the default name says which teacher: KD from another teacher is another run, not a refused resume
    args.run_name = args.run_name or utils.default_run_name(
        args, {"student": args.student, "teacher": teacher_label(args.teacher_ckpt)})
    route = route_anchors(args.teacher_ckpt, args.anchors) if args.distill == "rco" else None
    loaded = {}
    run = utils.Run(args, args.distill, {"student": args.student},
                    data_options={"with_index": True} if args.distill == "crd" else None,
                    extra_modules=lambda modules, data: setup_features(args, data, modules, loaded))
    size = run.data.image_size
    student = models.FeatureExtractor(run.nets["student"], size, loaded["student_features"]) \
        if loaded["student_features"] else plain(run.nets["student"])
    optimizers = [run.optimizers["student"]] + [run.optimizers[m] for m in run.modules if m not in run.networks]
    objective, beta = make_objective(args, run, loaded)

    if args.distill == "rco":
        try:
            schedule = anchor_schedule(len(route), args.epochs, args.switch_epochs)
        except ValueError as e:
            raise utils.UsageError(f"--switch-epochs: {e}") from None
        run.state.setdefault("rco_schedule", schedule)  # the original plan, also when --epochs grows on resume
        run.state.setdefault("rco_switch_epochs", [e for e in range(1, args.epochs) if schedule[e] != schedule[e - 1]])
        run.state.setdefault("rco_anchors", [{"epoch": e, "file": str(f)} for e, f in route.items()])
        teacher, current = None, None
    else:
        teacher_module = loaded["teacher"].to(run.device, memory_format=run.memory_format)
        teacher_info = describe_teacher(teacher_module, run)
        teacher = models.FeatureExtractor(teacher_module, size, loaded["teacher_features"]) \
            if loaded["teacher_features"] else plain(teacher_module)
        run.console.print(f"  teacher    {teacher_info['arch']} from {teacher_info['file']}: "
                          f"{teacher_info['test_top1']:.2f}% test top-1")
    if args.distill == "crd":
        sampler = datasets.ContrastSampler(datasets.train_targets(run.data).to(run.device), args.crd_mode)

    for epoch in run.epochs():
        if args.distill == "rco":
            plan = run.state["rco_schedule"]
            anchor = plan[min(epoch, len(plan)) - 1]
            if anchor != current:
                entry = run.state["rco_anchors"][anchor]
                module = load_teacher(entry["file"], run.data, run.device, run.memory_format)
                teacher_info = describe_teacher(module, run)
                entry["test_top1"] = teacher_info["test_top1"]
                teacher, current = plain(module), anchor
                run.console.print(f"  anchor {anchor + 1}/{len(run.state['rco_anchors'])}: teacher epoch "
                                  f"{entry['epoch']} ({teacher_info['test_top1']:.2f}% test top-1) from epoch {epoch}")
        for iteration, (images, targets, *index) in enumerate(run.train_batches()):
            batch = {}
            if args.distill == "crd":
                batch = {"indices": index[0], "sample_idx": sampler(index[0], args.nce_k, seed=args.seed, epoch=epoch,
                                                                    iteration=iteration, rank=run.rank)}
            run.log(train_step(student, teacher, optimizers, images, targets, objective, run.precision, **batch))
        run.step_schedulers()
        metrics = run.evaluate()
        run.end_epoch(metrics)

    if args.distill == "rco" and current != run.state["rco_schedule"][-1]:  # recorded with its final anchor
        final = run.state["rco_anchors"][run.state["rco_schedule"][-1]]
        teacher_info = describe_teacher(load_teacher(final["file"], run.data, run.device, run.memory_format), run)
    return run.finish(summary(args, run, loaded, beta, teacher_info))


if __name__ == "__main__":
    utils.main_guard(main)

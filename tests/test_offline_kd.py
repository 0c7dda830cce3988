"""train_kd.py's offline methods (Table 5): KD, FitNet, AT, CRD and RCO.

Each loss against a hand computation on tiny tensors (and its gradient where the paper
states one); FitNet's and AT's features on every teacher-student pair of the paper; CRD's
negative sampling and memory; RCO's route and anchor order; every method end to end,
resumed bit for bit after an interruption; bad input; the Table 5 script and summary."""
import csv
import io
import json
import math
import shutil
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import datasets
import models
import train_kd
import train_vanilla
import utils
from train_kd import (CRDHeads, HintRegressor, anchor_schedule, attention_loss, attention_map, contrast_scores,
                      crd_loss, hint_loss, kd_loss, nce_loss, okddip_kd_loss, update_memory)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import launch  # noqa: E402
import summarize  # noqa: E402

TINY = ["--dataset", "synthetic", "--train-subset", "32", "--test-subset", "16", "--batch-size", "16",
        "--workers", "0", "--no-progress"]
METHOD_ARGS = {"kd": [], "fitnet": [], "at": [], "crd": ["--nce-k", "8"], "rco": []}


def softmax(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


# --------------------------------------------------------------------------- KD

def test_kd_loss_by_hand_and_hinton_gradient():
    z_s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    z_t = torch.tensor([[3.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    alpha, tau = 0.3, 2.0
    total, ce, kl = kd_loss(z_s, z_t, y, alpha, tau)
    rows = [(z_s[b].tolist(), z_t[b].tolist(), y[b].item()) for b in range(2)]
    ce_hand = sum(-math.log(softmax(s)[c]) for s, _, c in rows) / 2
    kl_hand = sum(tau ** 2 * sum(q * math.log(q / p) for q, p in zip(softmax(t, tau), softmax(s, tau)))
                  for s, t, _ in rows) / 2
    assert ce.item() == pytest.approx(ce_hand) and kl.item() == pytest.approx(kl_hand)
    assert total.item() == pytest.approx(alpha * ce_hand + (1 - alpha) * kl_hand)
    total.backward()
    # Hinton et al. Eq. (2): d/dz_i of the soft term is (1/T)(q_i - p_i), q the student's, p the teacher's
    # tempered probabilities; times T^2 and (1 - alpha), mean over B
    soft = tau * (F.softmax(z_s.detach() / tau, 1) - F.softmax(z_t / tau, 1))
    hard = F.softmax(z_s.detach(), 1) - F.one_hot(y, 3)
    torch.testing.assert_close(z_s.grad, (alpha * hard + (1 - alpha) * soft) / 2)


def test_okddip_kd_loss_by_hand_and_its_gradient():
    z_s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    z_t = torch.tensor([[3.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2])
    tau = 3.0
    total, ce, kl = okddip_kd_loss(z_s, z_t, y, tau)
    rows = [(z_s[b].tolist(), z_t[b].tolist(), y[b].item()) for b in range(2)]
    ce_hand = sum(-math.log(softmax(s)[c]) for s, _, c in rows) / 2
    kl_hand = sum(tau ** 2 * sum((q + 1e-7) * (math.log(q + 1e-7) - math.log(p))
                                 for q, p in zip(softmax(t, tau), softmax(s, tau))) for s, t, _ in rows) / 2
    assert ce.item() == pytest.approx(ce_hand) and kl.item() == pytest.approx(kl_hand)
    assert total.item() == pytest.approx(ce_hand + kl_hand)  # CE and KL both weighted 1, as the release
    total.backward()
    # d/dz_i of -tau^2 sum_c r_c log p_c (r = q + 1e-7 sums to 1 + C 1e-7) is tau (p_i sum_c r_c - r_i)
    r = F.softmax(z_t.detach() / tau, 1) + 1e-7
    soft = tau * (F.softmax(z_s.detach() / tau, 1) * r.sum(1, keepdim=True) - r)
    hard = F.softmax(z_s.detach(), 1) - F.one_hot(y, 3)
    torch.testing.assert_close(z_s.grad, (hard + soft) / 2)
    assert z_t.grad is None  # the teacher is fixed


# --------------------------------------------------------------------------- FitNet

def test_hint_loss_by_hand_and_its_gradient():
    regressed = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]]]], requires_grad=True)   # (1, 1, 2, 2)
    hint = torch.tensor([[[[0.0, 2.0], [1.0, 1.0]]]], requires_grad=True)
    loss = hint_loss(regressed, hint)
    assert loss.item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    loss.backward()
    # L_HT's gradient (r - u), scaled by 2 / numel (mean instead of 1/2 sum); the hint gets none
    torch.testing.assert_close(regressed.grad, 2 * (regressed - hint).detach() / 4)
    assert hint.grad is None


@pytest.mark.parametrize("student,teacher,kernel,transposed", [
    ((16, 8, 8), (32, 8, 8), (1, 1), False),      # equal sizes: a 1x1 conv (RepDistiller's and the paper's)
    ((16, 16, 16), (32, 8, 8), (3, 3), False),    # twice the size: 3x3 stride 2
    ((16, 4, 4), (32, 8, 8), (4, 4), True),       # half the size: 4x4 stride-2 transposed conv
    ((16, 10, 9), (32, 8, 8), (3, 2), False),     # larger: the paper's N_g - N_h + 1 kernel
])
def test_hint_regressor_shapes(student, teacher, kernel, transposed):
    for kind, layers in (("conv-bn-relu", 3), ("conv-bn", 2), ("conv", 1)):
        regressor = HintRegressor(student, teacher, kind)
        assert len(regressor) == layers and regressor[0].kernel_size == kernel
        assert isinstance(regressor[0], torch.nn.ConvTranspose2d) == transposed
        out = regressor(torch.randn(2, *student))
        assert out.shape == (2, *teacher)
        if kind == "conv-bn-relu":
            assert out.min() >= 0
    with pytest.raises(ValueError, match="no regressor from a 3x3"):
        HintRegressor((16, 3, 3), (32, 8, 8))


# --------------------------------------------------------------------------- AT

def test_attention_map_and_loss_by_hand():
    a = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]], [[1.0, 2.0], [0.0, -1.0]]]])    # (1, 2, 2, 2)
    # F(A) = mean_c A_c^2 = [[1, 2], [2, 1]]; ||.||_2 = sqrt(10)
    expected = torch.tensor([[1.0, 2.0, 2.0, 1.0]]) / math.sqrt(10)
    torch.testing.assert_close(attention_map(a), expected)
    torch.testing.assert_close(attention_map(3 * a), expected)              # invariant to the feature's scale
    torch.testing.assert_close(attention_map(torch.cat([a, a], 1)), expected)  # and to the channel count (mean)
    b = torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])                           # F = [[0, 0], [0, 4]] -> e_4
    loss = attention_loss(a, b)
    e4 = torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert loss.item() == pytest.approx(((expected[0] - e4) ** 2).mean().item())
    # p = 1 sums |A_i|: [[2, 2], [2, 2]] -> uniform
    torch.testing.assert_close(attention_map(a, p=1), torch.full((1, 4), 0.5))


def test_attention_loss_gradient_reaches_the_student_only():
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    attention_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert torch.autograd.gradcheck(lambda x: attention_loss(x, t.detach()), (s.detach().requires_grad_(),))


# --------------------------------------------------------------------------- the paper's pairs

# (teacher, student, classes, image size): Tables 2-6 and Fig. 5 of the paper
PAPER_PAIRS = [
    ("wrn_40_2", "wrn_16_2", 100, 32), ("wrn_16_2", "mobilenetv2_0.5", 100, 32), ("wrn_16_2", "resnet32", 100, 32),
    ("wrn_16_8", "wrn_16_1", 10, 32),
    *[(f"wrn_16_{k}", "resnet20", 10, 32) for k in (2, 4, 8, 10)], ("wrn_16_2", "resnet20", 200, 64),
    ("resnet34", "mobilenetv2_1.4", 200, 64), ("resnet34", "resnet18", 1000, 224),
    ("resnet18", "mobilenetv2_0.5", 1000, 224),
]


def wrn_group_outputs(net, x, blocks_per_group):
    """A WRN's three group outputs by hand: the stem conv, then the sum each group's last block returns
    (what RepDistiller's ``wrn.py`` returns as f1, f2, f3), not the final BN-ReLU map."""
    layers = list(net.features)
    h, out = layers[0](x), []
    for group in range(3):
        for block in layers[1 + group * blocks_per_group: 1 + (group + 1) * blocks_per_group]:
            h = block(h)
        out.append(h)
    return out


def test_at_on_wrn_40_2_to_wrn_16_2_is_repdistillers(monkeypatch):
    """Table 5's pair: the three AT terms equal RepDistiller's ``Attention`` on the group outputs."""
    torch.manual_seed(0)
    teacher, student = models.build("wrn_40_2", 100).eval(), models.build("wrn_16_2", 100).train()
    monkeypatch.setattr(train_kd, "load_teacher", lambda path, data: teacher)
    args = train_kd.parse_args(["--teacher-ckpt", "x", "--distill", "at"])
    loaded = {}
    assert train_kd.setup_features(args, SimpleNamespace(image_size=32), {"student": student}, loaded) == {}
    objective, beta = train_kd.make_objective(args, None, loaded)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    with torch.no_grad():
        z_t, f_t = models.FeatureExtractor(teacher, 32, loaded["teacher_features"])(x)
        hand_t = wrn_group_outputs(teacher, x, 6)
    z_s, f_s = models.FeatureExtractor(student, 32, loaded["student_features"])(x)
    loss, values = objective(z_s, z_t, f_s, f_t, y)
    hand_s = wrn_group_outputs(student, x, 2)  # training mode: batch statistics, as in that forward

    def at(f):  # RepDistiller's distiller_zoo/AT.py
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))
    terms = [(at(s) - at(t)).pow(2).mean() for s, t in zip(hand_s, hand_t)]
    assert loaded["pairs"] == [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")] and beta == 1000
    for k, term in enumerate(terms, 1):
        torch.testing.assert_close(attention_loss(f_s[f"stage{k}"], f_t[f"stage{k}"]), term)
    torch.testing.assert_close(values["at_loss"], sum(terms))
    torch.testing.assert_close(loss, F.cross_entropy(z_s, y) + 1000 * sum(terms))
    final = [m for m in teacher.features if isinstance(m, torch.nn.BatchNorm2d)][-1]
    post_activation = (at(F.relu(student.features[7](hand_s[2]))) - at(F.relu(final(hand_t[2])))).pow(2).mean()
    assert not torch.isclose(post_activation, terms[2], rtol=0.05)  # the map after the final BN-ReLU differs


@pytest.fixture(scope="module")
def zoo():
    """Networks built once (the 224 px ImageNet ones take a while on a CPU)."""
    cache = {}

    def build(name, classes, size):
        if (name, classes, size) not in cache:
            cache[name, classes, size] = models.build(name, classes, size)
        return cache[name, classes, size]
    return build


def features_of(args, zoo, teacher, student, classes, size, monkeypatch):
    """train_kd.setup_features on a teacher of the zoo (instead of a checkpoint)."""
    t, s = zoo(teacher, classes, size), zoo(student, classes, size)
    monkeypatch.setattr(train_kd, "load_teacher", lambda path, data: t)
    data = SimpleNamespace(image_size=size, train=range(50))
    loaded = {}
    extra = train_kd.setup_features(args, data, {"student": s}, loaded)
    return extra, loaded, models.find_features(t, size), models.find_features(s, size)


@pytest.mark.parametrize("teacher,student,classes,size", PAPER_PAIRS)
def test_fitnet_and_at_on_the_paper_pairs(teacher, student, classes, size, zoo, monkeypatch):
    args = train_kd.parse_args(["--teacher-ckpt", "x", "--distill", "fitnet"])
    extra, loaded, t_feats, s_feats = features_of(args, zoo, teacher, student, classes, size, monkeypatch)
    (hint, guided), = loaded["pairs"]
    assert hint == "stage2" and t_feats[hint].shape[1:] == s_feats[guided].shape[1:]
    regressor, owner = extra["regressor"]
    assert owner == "student"
    assert regressor(torch.randn(2, *s_feats[guided].shape)).shape == (2, *t_feats[hint].shape)

    args = train_kd.parse_args(["--teacher-ckpt", "x", "--distill", "at"])
    extra, loaded, _, _ = features_of(args, zoo, teacher, student, classes, size, monkeypatch)
    assert extra == {} and loaded["pairs"] == models.match_stages(t_feats, s_feats)
    assert len(loaded["pairs"]) >= 2                     # every stage boundary the two networks share
    for t_stage, s_stage in loaded["pairs"]:
        maps = [attention_map(torch.randn(1, *f[name].shape)) for f, name in ((t_feats, t_stage), (s_feats, s_stage))]
        assert maps[0].shape == maps[1].shape

    args = train_kd.parse_args(["--teacher-ckpt", "x", "--distill", "crd"])
    extra, _, _, _ = features_of(args, zoo, teacher, student, classes, size, monkeypatch)
    heads = extra["crd"][0]
    assert heads.embed_s.in_features == s_feats["embedding"].shape[0]
    assert heads.embed_t.in_features == t_feats["embedding"].shape[0] and heads.memory_s.shape == (50, 128)


def test_fitnet_layers_by_flag_and_bad_layers(zoo, monkeypatch):
    args = train_kd.parse_args(["--teacher-ckpt", "x", "--distill", "fitnet", "--hint-layer", "3",
                                "--guided-layer", "2", "--regressor", "conv"])
    extra, loaded, _, _ = features_of(args, zoo, "wrn_16_2", "resnet20", 10, 32, monkeypatch)
    assert loaded["pairs"] == [("stage3", "stage2")] and len(extra["regressor"][0]) == 1
    assert extra["regressor"][0][0].stride == (2, 2)          # 16x16 guided -> 8x8 hint
    for flags, message in ((["--hint-layer", "4"], "the teacher has stages 1..3"),
                           (["--hint-layer", "1"], "no teacher stage of the same size"),
                           (["--guided-layer", "9"], "the student has stages 1..4")):
        args = train_kd.parse_args(["--teacher-ckpt", "x", "--distill", "fitnet", *flags])
        with pytest.raises(utils.UsageError, match=message):
            features_of(args, zoo, "wrn_16_2", "mobilenetv2_0.5", 10, 32, monkeypatch)


# --------------------------------------------------------------------------- CRD

def test_crd_scores_and_nce_loss_by_hand():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    anchor = torch.tensor([[0.6, 0.8]], requires_grad=True)
    idx = torch.tensor([[2, 0, 1]])
    scores = contrast_scores(anchor, memory, idx, tau=0.5)
    torch.testing.assert_close(scores, torch.tensor([[math.exp(2.0), math.exp(1.2), math.exp(1.6)]]))
    # N = 10 samples, K = 2 negatives: K P_n = 0.2; h(P) = P / (P + 0.2)
    p = torch.tensor([[0.5, 0.1, 0.3]], dtype=torch.float64, requires_grad=True)
    loss = nce_loss(p, 10, eps=0.0)
    expected = -(math.log(0.5 / 0.7) + math.log(0.2 / 0.3) + math.log(0.2 / 0.5))
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/dP [-log(P / (P + c))] = -c / (P (P + c)); d/dP [-log(c / (P + c))] = 1 / (P + c)
    torch.testing.assert_close(p.grad, torch.tensor([[-0.2 / (0.5 * 0.7), 1 / 0.3, 1 / 0.5]], dtype=torch.float64))
    scores.sum().backward()                                   # the memory is detached: the anchor gets it all
    torch.testing.assert_close(anchor.grad, (torch.exp(torch.tensor(2.0)) * memory[2] + math.exp(1.2) * memory[0]
                                             + math.exp(1.6) * memory[1]).unsqueeze(0) / 0.5)


def test_crd_loss_sets_z_once_from_the_first_batch():
    torch.manual_seed(0)
    heads = CRDHeads(6, 5, 4, n_data=12)
    stdv = 1 / math.sqrt(4 / 3)
    assert heads.memory_s.abs().max() <= stdv and heads.memory_t.abs().max() <= stdv
    assert heads.z.tolist() == [-1.0, -1.0]
    v_s, v_t = heads(torch.randn(3, 6), torch.randn(3, 5))
    torch.testing.assert_close(v_s.norm(dim=1), torch.ones(3))
    idx = torch.tensor([[0, 5, 6], [1, 7, 8], [2, 9, 10]])
    loss = crd_loss(v_s, v_t, heads, idx, tau=0.1)
    s_side = contrast_scores(v_s, heads.memory_t, idx, 0.1)
    t_side = contrast_scores(v_t, heads.memory_s, idx, 0.1)
    z = torch.stack([s_side.mean(), t_side.mean()]) * 12
    torch.testing.assert_close(heads.z, z.detach())
    torch.testing.assert_close(loss, nce_loss(s_side / z[0], 12) + nce_loss(t_side / z[1], 12))
    heads.memory_s.mul_(0.5)                                  # other scores, same Z
    crd_loss(v_s, v_t, heads, idx, tau=0.1)
    torch.testing.assert_close(heads.z, z.detach())
    fresh = CRDHeads(6, 5, 4, n_data=12)
    fresh.load_state_dict(heads.state_dict())                 # a resumed run keeps Z (a buffer)
    crd_loss(v_s.detach(), v_t.detach(), fresh, idx, tau=0.1)
    torch.testing.assert_close(fresh.z, z.detach())


def test_memory_update_by_hand():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    update_memory(memory, torch.tensor([2, 0]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), momentum=0.5)
    mixed = torch.tensor([0.3, 0.9])
    torch.testing.assert_close(memory[2], mixed / mixed.norm())
    torch.testing.assert_close(memory[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(memory[1], torch.tensor([0.0, 1.0]))  # rows not in the batch are kept


def test_negative_sampling_exact_mode():
    targets = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 3, 3])
    sampler = datasets.ContrastSampler(targets)
    idx = torch.tensor([0, 2, 5, 10, 9])
    out = sampler(idx, 5, seed=1, epoch=2, iteration=3)
    assert out.shape == (5, 6) and torch.equal(out[:, 0], idx)            # exact: the positive is the sample
    assert torch.all(targets[out[:, 1:]] != targets[idx][:, None])        # negatives: other classes only
    assert all(len(set(row)) == 5 for row in out[:, 1:].tolist())          # without replacement
    assert torch.equal(out, sampler(idx, 5, seed=1, epoch=2, iteration=3))  # a function of (seed, epoch, iteration)
    for other in (dict(seed=2, epoch=2, iteration=3), dict(seed=1, epoch=3, iteration=3),
                  dict(seed=1, epoch=2, iteration=4), dict(seed=1, epoch=2, iteration=3, rank=1)):
        assert not torch.equal(out, sampler(idx, 5, **other))
    # K above the 8 other-class samples of class 2: with replacement (the reference's rule), still other classes
    many = sampler(idx, 20, seed=1, epoch=2, iteration=3)
    assert many.shape == (5, 21) and torch.all(targets[many[:, 1:]] != targets[idx][:, None])
    assert set(many[2, 1:].tolist()) <= {0, 1, 2, 3, 4, 9, 10, 11} and len(set(many[2, 1:].tolist())) < 20
    # K = 9: without replacement where 9 or more samples are of other classes, with it for class 2 (8 others)
    mixed = sampler(idx, 9, seed=0, epoch=0, iteration=0)
    assert torch.all(targets[mixed[:, 1:]] != targets[idx][:, None])
    assert [len(set(row)) == 9 for row in mixed[:, 1:].tolist()] == [True, True, False, True, True]


def test_negative_sampling_is_uniform_over_the_other_classes():
    targets = torch.arange(40) % 4                                # 10 per class, 30 others each
    sampler = datasets.ContrastSampler(targets)
    counts = torch.zeros(40)
    for it in range(300):
        counts += torch.bincount(sampler(torch.tensor([0]), 10, seed=0, epoch=0, iteration=it)[0, 1:], minlength=40)
    assert counts[targets == 0].sum() == 0
    others = counts[targets != 0]                                 # 100 expected each (3000 draws over 30)
    assert others.min() > 60 and others.max() < 140


def test_negative_sampling_relax_mode_and_targets():
    targets = torch.tensor([0, 1, 0, 1, 0, 1])
    out = datasets.ContrastSampler(targets, "relax")(torch.tensor([0, 1, 2]), 2, seed=0, epoch=1, iteration=0)
    assert torch.equal(targets[out[:, 0]], torch.tensor([0, 1, 0]))       # a random sample of the same class
    assert torch.all(targets[out[:, 1:]] != targets[torch.tensor([0, 1, 2])][:, None])
    bundle = datasets.build("synthetic", train_subset=20, test_subset=10)
    torch.testing.assert_close(datasets.train_targets(bundle), bundle.train_arrays[1])
    with pytest.raises(ValueError, match="two or more classes"):
        datasets.ContrastSampler(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown contrast mode"):
        datasets.ContrastSampler(targets, "loose")


# --------------------------------------------------------------------------- RCO

def test_anchor_schedule():
    assert anchor_schedule(4, 10) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert anchor_schedule(4, 240)[:60] == [0] * 60 and anchor_schedule(4, 240)[60] == 1
    assert anchor_schedule(4, 240)[-60:] == [3] * 60
    assert anchor_schedule(1, 3) == [0, 0, 0]
    assert anchor_schedule(3, 2) == [1, 2]                        # fewer epochs than anchors: the later ones
    assert anchor_schedule(3, 6, [1, 5]) == [0, 1, 1, 1, 1, 2]
    for bad in ([5], [3, 2], [2, 2], [2, 6]):
        with pytest.raises(ValueError, match="increasing switch epochs below the 6 epochs"):
            anchor_schedule(3, 6, bad)


def test_route_epochs():
    assert train_vanilla.route_epochs(240, keep_route=4) == [60, 120, 180, 240]
    assert train_vanilla.route_epochs(300, keep_route=4) == [75, 150, 225, 300]
    assert train_vanilla.route_epochs(15, keep_route=4) == [3, 7, 11, 15]
    assert train_vanilla.route_epochs(1, keep_route=4) == [1]
    assert train_vanilla.route_epochs(10, keep_epochs=[5, 2, 5]) == [2, 5]
    assert train_vanilla.route_epochs(10) == []
    with pytest.raises(utils.UsageError, match="--keep-epochs 12 beyond the run's 10 epochs"):
        train_vanilla.route_epochs(10, keep_epochs=[4, 12])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny vanilla teacher of 2 epochs, its route (epochs 1, 2) kept."""
    out = tmp_path_factory.mktemp("teacher")
    train_vanilla.main([*TINY, "--epochs", "2", "--model", "wrn_10_2", "--role", "teacher", "--keep-route", "2",
                        "--out", str(out), "--run-name", "t"])
    return out / "vanilla" / "t"


def test_the_route_is_kept_and_loadable(teacher_dir):
    route = models.route_checkpoints(teacher_dir)
    assert list(route) == [1, 2] and route[1].name == "route_epoch1.pt"
    results = json.loads((teacher_dir / "results.json").read_text())
    assert results["route"] == {"epochs": [1, 2], "files": ["route_epoch1.pt", "route_epoch2.pt"]}
    last = torch.load(teacher_dir / "last.pt", weights_only=False)
    final = models.load(route[2])
    assert final.checkpoint["epoch"] == 2 and final.checkpoint["arch"] == "wrn_10_2"
    assert all(torch.equal(v, last["models"]["teacher"][k]) for k, v in final.state_dict().items())
    first = torch.load(route[1], weights_only=False)
    assert first["epoch"] == 1 and first["metrics"]["top1"] == last["history"][0]["test/teacher/top1"]
    assert not all(torch.equal(v, first["model"][k]) for k, v in final.state_dict().items())
    with pytest.raises(ValueError, match="not a run directory"):
        models.route_checkpoints(route[1])


def test_the_route_survives_an_interruption(tmp_path, interrupted_after):
    def teacher(name, *extra):
        return train_vanilla.main([*TINY, "--epochs", "3", "--model", "wrn_10_1", "--role", "teacher",
                                   "--keep-route", "3", "--out", str(tmp_path), "--run-name", name, *extra])
    teacher("straight")
    with interrupted_after(2):
        teacher("resumed")
    assert list(models.route_checkpoints(tmp_path / "vanilla" / "resumed")) == [1, 2]
    results = teacher("resumed", "--resume", "--epochs", "4")   # more epochs: the planned route (not 1 2 4) stays
    assert results["route"]["epochs"] == [1, 2, 3]
    assert list(models.route_checkpoints(tmp_path / "vanilla" / "resumed")) == [1, 2, 3]
    for epoch in (1, 2, 3):
        a, b = (torch.load(tmp_path / "vanilla" / name / f"route_epoch{epoch}.pt", weights_only=False)
                for name in ("straight", "resumed"))
        assert a["epoch"] == b["epoch"] == epoch
        assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_rco_learns_from_the_anchors_in_route_order(tmp_path, teacher_dir, monkeypatch):
    loads, load_teacher = [], train_kd.load_teacher

    def recording(path, *args, **kwargs):
        loads.append(Path(path).name)
        return load_teacher(path, *args, **kwargs)
    monkeypatch.setattr(train_kd, "load_teacher", recording)
    results = student(tmp_path, teacher_dir, "rco", "r", "--epochs", "4")
    assert loads == ["route_epoch1.pt", "route_epoch2.pt"]              # easy to hard, each loaded once
    rco = results["rco"]
    assert rco["anchor_epochs"] == [1, 2] and rco["switch_epochs"] == [2]
    assert [a["epoch"] for a in rco["anchors"]] == [1, 2] and all("test_top1" in a for a in rco["anchors"])
    assert results["teacher"]["file"].endswith("route_epoch2.pt")        # recorded with the final anchor
    loads.clear()
    results = student(tmp_path, teacher_dir, "rco", "one", "--epochs", "2", "--anchors", "2")
    assert loads == ["route_epoch2.pt"] and results["rco"]["anchor_epochs"] == [2]


# --------------------------------------------------------------------------- end to end, resumed exactly

def student(tmp_path, teacher_dir, method, name, *extra):
    return train_kd.main([*TINY, "--student", "wrn_10_1", "--teacher-ckpt", str(teacher_dir), "--distill", method,
                          *METHOD_ARGS[method], "--out", str(tmp_path), "--run-name", name, *extra])


@pytest.mark.parametrize("method", list(train_kd.METHODS))
def test_every_method_end_to_end_resumes_bit_for_bit(method, tmp_path, teacher_dir, interrupted_after):
    results = student(tmp_path, teacher_dir, method, "straight", "--epochs", "2")
    with interrupted_after(1):
        student(tmp_path, teacher_dir, method, "resumed", "--epochs", "2")
    assert torch.load(tmp_path / method / "resumed" / "last.pt", weights_only=False)["epoch"] == 1
    resumed_results = student(tmp_path, teacher_dir, method, "resumed", "--epochs", "2", "--resume")

    straight = torch.load(tmp_path / method / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / method / "resumed" / "last.pt", weights_only=False)
    roles = {"kd": ["student"], "fitnet": ["student", "regressor"], "at": ["student"], "crd": ["student", "crd"],
             "rco": ["student"]}[method]
    assert list(straight["models"]) == roles and straight["epoch"] == resumed["epoch"] == 2
    for role in roles:
        for key, value in straight["models"][role].items():
            assert torch.equal(value, resumed["models"][role][key]), (role, key)
    if method == "crd":
        heads = straight["models"]["crd"]
        assert {"memory_s", "memory_t", "z"} <= heads.keys() and heads["z"].min() > 0
        torch.testing.assert_close(heads["memory_s"].norm(dim=1), torch.ones(32))  # every row updated: unit norm
    on_disk = json.loads((tmp_path / method / "resumed" / "results.json").read_text())
    assert on_disk["method"] == method and on_disk["status"] == "finished"
    assert on_disk[method] == results[method] == resumed_results[method]
    assert on_disk["teacher"]["arch"] == "wrn_10_2"
    assert [i["from_epoch"] for i in on_disk["invocations"]] == [0, 1]
    rows = [json.loads(line) for line in (tmp_path / method / "resumed" / "metrics.jsonl").read_text().splitlines()]
    expected = {"kd": "train/kl", "fitnet": "train/hint_loss", "at": "train/at_loss", "crd": "train/crd_loss",
                "rco": "train/kl"}[method]
    assert expected in rows[0] and math.isfinite(rows[0][expected]) and rows[0][expected] > 0


def test_kd_keeps_the_teacher_fixed_and_its_record(tmp_path, teacher_dir, loaded_teacher):
    captured = loaded_teacher
    results = student(tmp_path, teacher_dir, "at", "at", "--epochs", "1", "--kd-weight", "0.5", "--tau", "4")
    saved = torch.load(teacher_dir / "best_teacher.pt", weights_only=False)
    assert all(torch.equal(captured["teacher"].state_dict()[k], v) for k, v in saved["model"].items())
    assert not captured["teacher"].training and not any(p.requires_grad for p in captured["teacher"].parameters())
    assert results["at"] == {"kd_weight": 0.5, "tau": 4.0, "beta": 1000.0, "p": 2.0,
                             "pairs": [["stage1", "stage1"], ["stage2", "stage2"], ["stage3", "stage3"]]}
    assert results["teacher"]["test_top1"] == pytest.approx(saved["metrics"]["top1"])
    row = json.loads((tmp_path / "at" / "at" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train/ce", "train/kl", "train/at_loss", "train/loss"} <= row.keys()


def test_okddip_release_kd_end_to_end(tmp_path, teacher_dir):
    results = student(tmp_path, teacher_dir, "kd", "okddip", "--epochs", "1", "--kd-form", "okddip",
                      "--recipe", "okddip", "--student", "resnet32")  # the release's network
    assert results["kd"] == {"form": "okddip", "alpha": 1.0, "tau": 3.0}
    network = results["networks"]["student"]
    assert (network["optimizer"], network["variant"], network["lr_drop"]) == ("sgd", "okddip", "start")


def run_guarded(argv, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["train_kd.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        utils.main_guard(train_kd.main)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags,message", [
    (["--distill", "kd", "--nce-k", "5"], "--nce-k applies to --distill crd, not kd"),
    (["--distill", "crd", "--alpha", "0.5"], "--alpha applies to --distill kd or rco, not crd"),
    (["--distill", "rco", "--kd-form", "okddip"], "--kd-form applies to --distill kd, not rco"),
    (["--kd-form", "okddip", "--alpha", "0.5"], "--alpha weighs --kd-form table1"),
    (["--distill", "fitnet", "--hint-layer", "7"], "--hint-layer 7: the teacher has stages 1..3"),
    (["--distill", "rco", "--anchors", "3"], "--anchors 3: not in the route"),
    (["--distill", "rco", "--switch-epochs", "1", "1"], "--switch-epochs: 2 anchors need 1 increasing switch"),
    (["--distill", "bogus"], "invalid choice: 'bogus'"),
])
def test_bad_input_is_one_line_and_exit_2(flags, message, tmp_path, teacher_dir, monkeypatch, capsys):
    code, err = run_guarded([*TINY, "--student", "wrn_10_1", "--teacher-ckpt", str(teacher_dir), *flags,
                             "--out", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_rco_needs_a_route(tmp_path, teacher_dir, monkeypatch, capsys):
    code, err = run_guarded([*TINY, "--teacher-ckpt", str(teacher_dir / "best_teacher.pt"), "--distill", "rco",
                             "--out", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "needs the teacher's run directory" in err[0], err
    bare = tmp_path / "bare"
    shutil.copytree(teacher_dir, bare, ignore=shutil.ignore_patterns("route_*"))
    code, err = run_guarded([*TINY, "--teacher-ckpt", str(bare), "--distill", "rco", "--out", str(tmp_path)],
                            monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "keeps no training route" in err[0], err


def test_help_names_every_method_with_its_paper(capsys):
    with pytest.raises(SystemExit):
        train_kd.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, paper in (("kd", "Distilling the Knowledge in a Neural Network"), ("fitnet", "FitNets: Hints for Thin"),
                        ("at", "Paying More Attention to Attention"),
                        ("crd", "Contrastive Representation Distillation"),
                        ("rco", "Knowledge Distillation via Route Constrained Optimization")):
        assert f"{name}: {train_kd.METHODS[name]}" in text and paper in text


# --------------------------------------------------------------------------- Table 5: script and summary

def test_launcher_puts_each_method_in_its_folder():
    job = launch.Job("table5", "x-seed0", "train_kd.py", ["--distill", "crd", "--seed", "0"])
    assert job.method == "crd" and job.run_dir(Path("out")) == Path("out/table5/crd/x-seed0")
    assert launch.Job("table5", "x", "train_kd.py", ["--seed", "0"]).method == "kd"
    assert launch.Job("table5", "x", "train_vanilla.py", []).method == "vanilla"


def test_summary_fills_all_seven_columns_of_table5(tmp_path, teacher_dir):
    """Real results.json files of every method, relabelled as the paper's CIFAR-100 networks."""
    root = tmp_path / "runs"
    for method in train_kd.METHODS:
        results = student(tmp_path, teacher_dir, method, "s", "--epochs", "1")
        place(root, method, results, student_arch="wrn_16_2", teacher_arch="wrn_40_2")
    teacher = json.loads((teacher_dir / "results.json").read_text())
    place(root, "vanilla", teacher, teacher_arch=None, role_arch={"teacher": "wrn_40_2"}, name="t")
    place(root, "vanilla", {**teacher, "networks": {"student": {**teacher["networks"]["teacher"]}}},
          teacher_arch=None, role_arch={"student": "wrn_16_2"}, name="s")
    switokd = {**teacher, "method": "switokd", "networks": {"student": dict(teacher["networks"]["teacher"]),
                                                            "teacher": dict(teacher["networks"]["teacher"])}}
    place(root, "switokd", switokd, teacher_arch=None, role_arch={"student": "wrn_16_2", "teacher": "wrn_40_2"})
    out = io.StringIO()
    with redirect_stdout(out):
        assert summarize.main([str(root), "--csv"]) == 0
    cells = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(out.getvalue())) if r["table"] == "table5"}
    for column in ("Vanilla", "KD", "FitNet", "AT", "CRD", "RCO", "SwitOKD"):
        assert cells["student WRN-16-2", column]["n"] == "1", column
    assert cells["teacher WRN-40-2", "Vanilla"]["n"] == "1" and cells["teacher WRN-40-2", "SwitOKD"]["n"] == "1"
    assert float(cells["student WRN-16-2", "CRD"]["paper"]) == 75.01
    out = io.StringIO()
    with redirect_stdout(out):
        summarize.main([str(root)])
    header = next(line for line in out.getvalue().splitlines() if line.startswith("|  | Vanilla"))
    assert header == "|  | Vanilla | KD | FitNet | AT | CRD | RCO | SwitOKD |"


def place(root, method, results, student_arch=None, teacher_arch=None, role_arch=None, name="s"):
    """Write ``results`` as a finished CIFAR-100 run of ``method`` in root/table5/."""
    results = json.loads(json.dumps(results))
    results.update(method=method, dataset="cifar100", status="finished")
    for role, arch in (role_arch or {"student": student_arch}).items():
        results["networks"][role]["arch"] = arch
    if teacher_arch:
        results["teacher"]["arch"] = teacher_arch
    run_dir = root / "table5" / method / f"{name}-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results))

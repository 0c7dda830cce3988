"""`--recipe official` side by side with the released scripts (hfutqian/SwitOKD).

Each ``released_*`` function below replays what a released training script does in one
iteration (its distances, its decision, its losses, its backward passes and optimiser
steps, in its order), written from the released code's behaviour
(docs/FIDELITY.md and the scripts' main.py). From the same
initial weights and the same batches, the repository's ``train_step`` under the official
settings must take the same modes and reach the same losses and weights, to float noise
(the losses are computed from float32 logits, as under autocast; over eight iterations,
before training at lr 0.1 amplifies rounding differences). The students start confidently
wrong (a sharpened classifier) and the teachers a little trained, so that every mode
combination occurs. The learning-rate schedules are compared epoch by epoch.
"""
import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

import models
import train_multi
import train_switokd
import utils

CPU = utils.Precision(torch.device("cpu"))
DTYPE = torch.float64


def released_kl(p_logit, q_logit):
    """The scripts' kl_div(p_logit, q_logit, 1): KL(softmax(p) || softmax(q)), summed over classes, batch mean."""
    p = F.softmax(p_logit, dim=-1)
    return torch.mean(torch.sum(p * (F.log_softmax(p_logit, dim=-1) - F.log_softmax(q_logit, dim=-1)), 1))


def released_distances(z_s, z_t, y):
    """(ps_pt, s_label, t_label) as the scripts compute them (tau = 1, sum over classes, batch mean)."""
    onehot = F.one_hot(y, z_s.size(1)).to(z_s.dtype)
    s_label = torch.mean(torch.sum(torch.abs(F.softmax(z_s, -1) - onehot), 1))
    t_label = torch.mean(torch.sum(torch.abs(F.softmax(z_t, -1) - onehot), 1))
    ps_pt = torch.mean(torch.sum(torch.abs(F.softmax(z_s, -1) - F.softmax(z_t, -1)), 1))
    return ps_pt, s_label, t_label


def released_delta(s_label, t_label, eps_s, eps_t):
    return s_label - torch.exp(-1 * (eps_t / (eps_t + eps_s))) * t_label


def released_two_network_step(teacher, student, opt_t, opt_s, x, y):
    """CIFAR-10/100, Tiny-ImageNet and ImageNet main.py: one iteration; returns (expert, loss_s)."""
    opt_t.zero_grad()
    out_t = teacher(x)
    opt_s.zero_grad()
    out_s = student(x)
    ps_pt, s_label, t_label = released_distances(out_s.detach(), out_t.detach(), y)
    if ps_pt > released_delta(s_label, t_label, s_label, t_label) and t_label < s_label:
        loss_s = F.cross_entropy(out_s, y) + released_kl(out_t.detach(), out_s)
        loss_s.backward()
        opt_s.step()
        return True, loss_s.item()
    loss_t = F.cross_entropy(out_t, y) + released_kl(out_s.detach(), out_t)
    loss_s = F.cross_entropy(out_s, y) + released_kl(out_t.detach(), out_s)
    loss_t.backward()
    loss_s.backward()
    opt_t.step()
    opt_s.step()
    return False, loss_s.item()


def released_three_forwards(wrn2, wrn10, mobile, opt_2, opt_10, opt_m, x):
    """The three-network scripts' opening, in their order: each optimiser zeroed, then its network's forward."""
    outputs = []
    for net, opt in ((wrn2, opt_2), (wrn10, opt_10), (mobile, opt_m)):
        opt.zero_grad()
        outputs.append(net(x))
    return outputs


def released_1t2s_step(wrn2, wrn10, mobile, opt_2, opt_10, opt_m, x, y):
    """The released 1T2S main.py (teacher WRN-16-10; students WRN-16-2 and MobileNet): returns (w1, w2)."""
    out, out2, out_m = released_three_forwards(wrn2, wrn10, mobile, opt_2, opt_10, opt_m, x)
    ps_pt2, s_label2, t_label2 = released_distances(out_m.detach(), out2.detach(), y)
    delta2 = released_delta(s_label2, t_label2, s_label2, t_label2)
    ps_pt, s_label, t_label = released_distances(out.detach(), out2.detach(), y)
    delta = released_delta(s_label, t_label, s_label2, t_label2)  # epsilon from the other pair
    w2 = 0 if (ps_pt2 > delta2 and t_label2 < s_label2) else 1
    w1 = 0 if (ps_pt > delta and t_label < s_label) else 1
    w0 = 0 if (w1 == 0 and w2 == 0) else 1
    loss_10 = w0 * F.cross_entropy(out2, y) + w2 * released_kl(out_m.detach(), out2) + w1 * released_kl(out.detach(), out2)
    loss_10.backward()
    opt_10.step()  # also when w0 = w1 = w2 = 0: a zero loss, but momentum and weight decay still act
    loss_2 = F.cross_entropy(out, y) + released_kl(out_m.detach(), out) + released_kl(out2.detach(), out)
    loss_2.backward()
    opt_2.step()
    loss_m = F.cross_entropy(out_m, y) + released_kl(out.detach(), out_m) + released_kl(out2.detach(), out_m)
    loss_m.backward()
    opt_m.step()
    return w1, w2, {"student1": loss_2.item(), "student2": loss_m.item(), "teacher1": loss_10.item()}


def released_2t1s_step(wrn2, wrn10, mobile, opt_2, opt_10, opt_m, x, y):
    """The released 2T1S main.py (teachers WRN-16-2 and WRN-16-10; student MobileNet): returns (flag, flag2)."""
    out, out2, out_m = released_three_forwards(wrn2, wrn10, mobile, opt_2, opt_10, opt_m, x)
    losses = {}
    ps_pt, s_label, t_label = released_distances(out_m.detach(), out.detach(), y)
    flag = int(bool(ps_pt > released_delta(s_label, t_label, s_label, t_label) and t_label < s_label))
    if not flag:
        loss = F.cross_entropy(out, y) + released_kl(out_m.detach(), out) + released_kl(out2.detach(), out)
        loss.backward()
        opt_2.step()
        losses["teacher2"] = loss.item()
    ps_pt2, s_label2, t_label2 = released_distances(out_m.detach(), out2.detach(), y)
    delta2 = released_delta(s_label2, t_label2, s_label, t_label)  # epsilon from the other pair
    flag2 = int(bool(ps_pt2 > delta2 and t_label2 < s_label2))
    if not flag2:
        loss2 = F.cross_entropy(out2, y) + released_kl(out_m.detach(), out2) + released_kl(out.detach(), out2)
        loss2.backward()
        opt_10.step()
        losses["teacher1"] = loss2.item()
    loss_m = F.cross_entropy(out_m, y) + released_kl(out.detach(), out_m) + released_kl(out2.detach(), out_m)
    loss_m.backward()
    opt_m.step()
    losses["student1"] = loss_m.item()
    return flag, flag2, losses


# --------------------------------------------------------------------------- fixtures

def tiny_net(seed, width=1, sharpen=1.0):
    """A small WRN (without conv biases: a bias before BatchNorm has a zero true gradient, whose
    rounding noise Adam would blow up to full-size steps), its classifier scaled by ``sharpen``."""
    torch.manual_seed(seed)
    net = models.build(f"wrn_10_{width}", 10).to(DTYPE)
    with torch.no_grad():
        net.fc.weight.mul_(sharpen)
    return net


def batches(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g, dtype=DTYPE), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def warm_up(net, data):
    """A few cross-entropy steps on some of the test's batches."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def sgd(net, lr, wd=5e-4):
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=wd)


def adam(net):
    return torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-4)


def switokd_cfg(**overrides):
    parsed = train_switokd.parse_args(["--recipe", "official"])
    return argparse.Namespace(**{**vars(parsed), **overrides})


def assert_same_weights(a, b, atol=2e-6):
    """Equal to float noise (the engine computes the losses from float32 logits)."""
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=atol, msg=name)


ADAM_ATOL = 1e-3
"""Adam divides each step by sqrt(v) + 1e-8, so a weight whose gradient is near zero moves by up
to a full step on rounding noise alone: the MobileNet (Adam) is compared loosely; its losses,
and every decision, still agree to float noise."""


def assert_same_losses(ours, released, tau=1.0):
    """Every loss the released step computed equals ours (CE + KL terms of that network)."""
    for role, value in released.items():
        assert (ours[f"{role}/ce"] + ours[f"{role}/kl"]).item() == pytest.approx(value, rel=1e-5), role


# --------------------------------------------------------------------------- the two-network step

def test_two_network_step_follows_the_released_script(lr_t=0.1, lr_s=0.01):  # the CIFAR-100 script's rates
    """The step is the same in every two-network script (CIFAR-10/100, Tiny-ImageNet, ImageNet); only the
    optimisers differ, which the schedule tests below and the recipe tables cover."""
    data = batches()
    teacher, student = warm_up(tiny_net(0, 2), data[:4] * 2), tiny_net(1, sharpen=20)
    ours = {"t": copy.deepcopy(teacher), "s": copy.deepcopy(student)}
    opt_t, opt_s = sgd(teacher, lr_t), sgd(student, lr_s)
    our_t, our_s = sgd(ours["t"], lr_t), sgd(ours["s"], lr_s)
    cfg = switokd_cfg()
    modes = []
    for x, y in data:
        expert, loss_s = released_two_network_step(teacher, student, opt_t, opt_s, x, y)
        values = train_switokd.train_step(ours["s"], ours["t"], our_s, our_t, x, y, cfg, CPU, reduce=lambda v: v)
        assert bool(values["expert"]) == expert
        assert values["student_ce"] + values["student_kl"] == pytest.approx(loss_s, rel=1e-5)
        modes.append(expert)
    assert True in modes and False in modes  # both modes compared
    assert_same_weights(teacher, ours["t"])
    assert_same_weights(student, ours["s"])


def multi_cfg(topology):
    parsed = train_multi.parse_args(["--topology", topology, "--recipe", "official"])
    return parsed


def test_1t2s_step_follows_the_released_script():
    cfg = multi_cfg("1T2S")
    assert (cfg.paused_teacher, cfg.pair_epsilon, cfg.switch_rule) == ("zero-step", "other-pair", "text")
    data = batches()
    wrn10 = warm_up(tiny_net(0, 3), data[:4] * 2)
    wrn2, mobile = tiny_net(1, 2, sharpen=10), tiny_net(2, sharpen=10)
    released = [wrn2, wrn10, mobile]
    opts = [sgd(wrn2, 0.1), sgd(wrn10, 0.1), adam(mobile)]
    ours = {"student1": copy.deepcopy(wrn2), "student2": copy.deepcopy(mobile), "teacher1": copy.deepcopy(wrn10)}
    our_opts = {"student1": sgd(ours["student1"], 0.1), "student2": adam(ours["student2"]),
                "teacher1": sgd(ours["teacher1"], 0.1)}
    seen = set()
    for x, y in data:
        w1, w2, losses = released_1t2s_step(*released, *opts, x, y)
        row, logged = train_multi.train_step(ours, our_opts, x, y, ["teacher1"], ["student1", "student2"], cfg, CPU,
                                             reduce=lambda v: v)
        assert row["expert"] == [float(1 - w1), float(1 - w2)]
        assert_same_losses(logged, losses if (w1, w2) != (0, 0) else {k: v for k, v in losses.items() if k != "teacher1"})
        seen.add((w1, w2))
    assert {(0, 0), (1, 0), (1, 1)} <= seen  # a fully paused (zero-step) teacher, a half-paused, a training one
    assert_same_weights(wrn2, ours["student1"])
    assert_same_weights(wrn10, ours["teacher1"])
    assert_same_weights(mobile, ours["student2"], ADAM_ATOL)


def test_2t1s_step_follows_the_released_script():
    cfg = multi_cfg("2T1S")
    assert (cfg.paused_teacher, cfg.pair_epsilon) == ("suspend", "other-pair")
    data = batches()
    wrn10, wrn2 = warm_up(tiny_net(0, 3), data[:4] * 2), warm_up(tiny_net(1, 2), data[:4] * 2)
    mobile = tiny_net(2, sharpen=10)
    released = [wrn2, wrn10, mobile]
    opts = [sgd(wrn2, 0.1), sgd(wrn10, 0.1), adam(mobile)]
    ours = {"student1": copy.deepcopy(mobile), "teacher1": copy.deepcopy(wrn10), "teacher2": copy.deepcopy(wrn2)}
    our_opts = {"student1": adam(ours["student1"]), "teacher1": sgd(ours["teacher1"], 0.1),
                "teacher2": sgd(ours["teacher2"], 0.1)}
    seen = set()
    for x, y in data:
        flag, flag2, losses = released_2t1s_step(*released, *opts, x, y)
        row, logged = train_multi.train_step(ours, our_opts, x, y, ["teacher1", "teacher2"], ["student1"], cfg, CPU,
                                             reduce=lambda v: v)
        assert row["expert"] == [float(flag2), float(flag)]  # our pairs: (WRN-16-10, MobileNet), (WRN-16-2, MobileNet)
        assert_same_losses(logged, losses)
        seen.update((flag, flag2))
    assert seen == {0, 1}
    assert_same_weights(wrn2, ours["teacher2"])
    assert_same_weights(wrn10, ours["teacher1"])
    assert_same_weights(mobile, ours["student1"], ADAM_ATOL)


# --------------------------------------------------------------------------- schedules

def released_lr(base, epoch, update_list):
    """adjust_learning_rate(optimizer, epoch) of the scripts, applied at the start of 1-based epoch 1..epoch."""
    lr = base
    for e in range(1, epoch + 1):
        if e in update_list:
            lr *= 0.1
    return lr


def our_lrs(recipe, epochs):
    """The learning rate of each 1-based epoch under the engine's schedule (stepped after every epoch)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = utils.build_optimizer([param], recipe)
    schedule = utils.lr_schedule(optimizer, utils.scaled_milestones(recipe, epochs), recipe.gamma, recipe.lr_drop)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


@pytest.mark.parametrize("dataset,role,network,script,update_list", [
    ("cifar100", "teacher", None, None, (140, 200, 250)),
    ("cifar100", "student", None, None, (140, 200, 250)),
    ("cifar10", "student", None, None, (100, 150, 200)),
    ("tinyimagenet", "teacher", None, None, (100, 140, 180)),
    ("cifar100", "student1", "mobilenet", "three-networks", (140, 200, 250)),
    ("cifar100", "student1", "wrn_16_2", "three-networks", (140, 200, 250)),
])
def test_official_schedule_is_the_released_one(dataset, role, network, script, update_list):
    recipe = utils.recipe_for("official", dataset, role, network, script)
    lrs = our_lrs(recipe, recipe.epochs)
    assert lrs == pytest.approx([released_lr(recipe.lr, e, update_list) for e in range(1, recipe.epochs + 1)])


def test_imagenet_script_counts_epochs_from_zero():
    recipe = utils.recipe_for("official", "imagenet", "student")
    lrs = our_lrs(recipe, recipe.epochs)
    assert lrs == pytest.approx([0.1 * 0.1 ** ((e - 1) // 30) for e in range(1, 121)])  # 0-based epoch // 30


@pytest.mark.parametrize("recipe_name,m", [("paper", 140), ("official", 140)])
def test_learning_rate_around_a_milestone(recipe_name, m):
    """Epochs m-1, m, m+1 (1-based): MultiStepLR timing drops after epoch m, the released timing at epoch m."""
    recipe = utils.recipe_for(recipe_name, "cifar100", "teacher")
    lrs = our_lrs(recipe, recipe.epochs)
    base = recipe.lr
    if recipe_name == "paper":
        assert lrs[m - 2:m + 1] == pytest.approx([base, base, base / 10])
    else:
        assert lrs[m - 2:m + 1] == pytest.approx([base, base / 10, base / 10])


def test_three_network_recipe_is_keyed_by_network():
    table = {net: utils.recipe_for("official", "cifar100", role, net, "three-networks")
             for role, net in (("teacher1", "wrn_16_10"), ("student1", "wrn_16_2"), ("student2", "mobilenet"),
                               ("teacher2", "wrn_16_2"))}
    assert (table["wrn_16_10"].optimizer, table["wrn_16_10"].lr, table["wrn_16_10"].weight_decay) == ("sgd", 0.1, 5e-4)
    assert (table["wrn_16_2"].optimizer, table["wrn_16_2"].lr) == ("sgd", 0.1)  # as a student (1T2S) and as a teacher
    assert (table["mobilenet"].optimizer, table["mobilenet"].lr, table["mobilenet"].weight_decay) == ("adam", 0.01, 1e-4)
    assert {r.epochs for r in table.values()} == {269} and table["mobilenet"].script_init
    assert {r.milestones for r in table.values()} == {(140, 200, 250)}

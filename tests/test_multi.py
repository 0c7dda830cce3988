"""SwitOKD with several networks (train_multi.py): the rules of Sec. 2.7, the losses, the runs."""
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distill
import train_multi
import train_switokd
import utils
from distill import kl_loss
from train_multi import distillation_sources, network_loss, paused_teachers
from train_switokd import student_loss, teacher_loss

ITERATIONS = 4
REAL_DECISION = distill.switching_decision


def tiny(tmp_path, *extra, iterations=ITERATIONS):
    """Flags of a 1-epoch run of ``iterations`` mini-batches of 4 synthetic images."""
    return ["--dataset", "synthetic", "--train-subset", str(4 * iterations), "--test-subset", "4",
            "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress",
            "--out", str(tmp_path), "--run-name", "r", *extra]


# --------------------------------------------------------------------------- the pausing rules

T, S = "teacher", "student"
T1, T2, S1, S2 = "teacher1", "teacher2", "student1", "student2"

ONE_PAIR = [  # expert of (T, S) -> paused, sources
    (False, [], {S: [T], T: [S]}),
    (True, [T], {S: [T]}),
]

ONE_TEACHER_TWO_STUDENTS = [  # expert of (T1, S1), (T1, S2) -> paused teachers, KL sources
    ((False, False), [], {S1: [T1, S2], S2: [T1, S1], T1: [S1, S2]}),
    ((True, False), [], {S1: [T1, S2], S2: [T1, S1], T1: [S2]}),
    ((False, True), [], {S1: [T1, S2], S2: [T1, S1], T1: [S1]}),
    ((True, True), [T1], {S1: [T1, S2], S2: [T1, S1]}),
]

TWO_TEACHERS_ONE_STUDENT = [  # expert of (T1, S1), (T2, S1) -> paused teachers, KL sources
    ((False, False), [], {S1: [T1, T2], T1: [T2, S1], T2: [T1, S1]}),
    ((True, False), [T1], {S1: [T1, T2], T2: [T1, S1]}),
    ((False, True), [T2], {S1: [T1, T2], T1: [T2, S1]}),
    ((True, True), [T1, T2], {S1: [T1, T2]}),
]


@pytest.mark.parametrize("mode, paused, sources", ONE_PAIR)
def test_rules_one_pair_are_switokd(mode, paused, sources):
    expert = {(T, S): mode}
    assert paused_teachers(expert) == paused
    assert distillation_sources(expert, [T], [S]) == sources


@pytest.mark.parametrize("modes, paused, sources", ONE_TEACHER_TWO_STUDENTS)
def test_rules_1t2s(modes, paused, sources):
    expert = dict(zip([(T1, S1), (T1, S2)], modes))
    assert paused_teachers(expert) == paused
    assert distillation_sources(expert, [T1], [S1, S2]) == sources


@pytest.mark.parametrize("modes, paused, sources", TWO_TEACHERS_ONE_STUDENT)
def test_rules_2t1s(modes, paused, sources):
    expert = dict(zip([(T1, S1), (T2, S1)], modes))
    assert paused_teachers(expert) == paused
    assert distillation_sources(expert, [T1, T2], [S1]) == sources


def test_rules_two_teachers_two_students_every_combination():
    pairs = [(t, s) for t in (T1, T2) for s in (S1, S2)]
    for modes in itertools.product([False, True], repeat=4):
        expert = dict(zip(pairs, modes))
        sources = distillation_sources(expert, [T1, T2], [S1, S2])
        assert sources[S1] == [T1, T2, S2] and sources[S2] == [T1, T2, S1]
        for i, (t, other) in enumerate([(T1, T2), (T2, T1)]):
            t_modes = modes[2 * i:2 * i + 2]
            assert (t in paused_teachers(expert)) == all(t_modes)
            if all(t_modes):
                assert t not in sources
            else:
                learning = [s for s, m in zip((S1, S2), t_modes) if not m]
                assert sources[t] == [other, *learning]


# --------------------------------------------------------------------------- the losses

def test_network_loss_by_hand_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    guides = [torch.randn(5, 7, dtype=torch.float64) for _ in range(2)]
    y = torch.tensor([0, 3, 6, 2, 2])
    tau, weight = 2.0, 0.7
    total, ce, kl = network_loss(z, guides, y, weight, tau)

    p = F.softmax(z / tau, 1)
    by_hand = sum((F.softmax(g / tau, 1) * (F.log_softmax(g / tau, 1) - p.log())).sum(1).mean() * tau ** 2
                  for g in guides)
    assert kl.item() == pytest.approx(by_hand.item(), rel=1e-12)
    assert ce.item() == pytest.approx(-F.log_softmax(z, 1)[range(5), y].mean().item(), rel=1e-12)
    assert total.item() == pytest.approx(ce.item() + weight * by_hand.item(), rel=1e-12)

    # Eqn. (7) with several guides: (p^1 - y) + weight tau sum_g (p^tau - p_g^tau), over the batch.
    total.backward()
    kl_gradient = sum(p - F.softmax(g / tau, 1) for g in guides)
    expected = (F.softmax(z, 1) - F.one_hot(y, 7)) + weight * tau * kl_gradient
    assert torch.allclose(z.grad, expected.detach() / 5, atol=1e-12)


def test_network_loss_without_guides_is_cross_entropy():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    total, ce, kl = network_loss(z, [], y, 0.5)
    assert kl.item() == 0 and torch.equal(total, F.cross_entropy(z, y))


def test_network_loss_with_one_guide_is_switokd_bit_for_bit():
    torch.manual_seed(1)
    z_s, z_t = (torch.randn(8, 10, requires_grad=True) for _ in range(2))
    y = torch.randint(0, 10, (8,))
    for mine, theirs in [(network_loss(z_s, [z_t], y, 0.3, 3.0), student_loss(z_s, z_t, y, 0.3, 3.0)),
                         (network_loss(z_t, [z_s], y, 0.6, 3.0), teacher_loss(z_t, z_s, y, 0.6, 3.0))]:
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
        grad_mine = torch.autograd.grad(mine[0], (z_s, z_t), allow_unused=True)
        grad_theirs = torch.autograd.grad(theirs[0], (z_s, z_t), allow_unused=True)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grad_mine, grad_theirs))
    assert network_loss(z_s, [z_t, z_t], y)[2].item() == pytest.approx(2 * kl_loss(z_t, z_s).item())


# --------------------------------------------------------------------------- flags

def test_presets_and_overrides():
    args = train_multi.parse_args(["--topology", "1T2S"])
    assert (args.teachers, args.students) == (["wrn_16_10"], ["wrn_16_2", "mobilenet"])
    args = train_multi.parse_args(["--topology", "2T1S", "--students", "resnet20"])
    assert (args.teachers, args.students) == (["wrn_16_10", "wrn_16_2"], ["resnet20"])
    args = train_multi.parse_args(["--teachers", "a", "b", "--students", "c", "d", "e"])
    assert train_multi.role_names(args.teachers, args.students) == (
        {S1: "c", S2: "d", "student3": "e"}, {T1: "a", T2: "b"})
    assert train_multi.role_names(["a"], ["b"]) == ({S: "b"}, {T: "a"})
    assert (args.switch_rule, args.paused_teacher, args.pair_epsilon) == ("text", "suspend", "own")


@pytest.mark.parametrize("argv, paused_teacher, pair_epsilon", [
    (["--topology", "1T2S"], "suspend", "own"),
    (["--topology", "2T1S"], "suspend", "own"),
    # the released three-network scripts: 1T2S steps a paused teacher on a zero loss; both take the
    # first pair's epsilon from the second pair's distances
    (["--topology", "1T2S", "--recipe", "official"], "zero-step", "other-pair"),
    (["--topology", "2T1S", "--recipe", "official"], "suspend", "other-pair"),
    (["--teachers", "a", "--students", "b", "--recipe", "official"], "suspend", "own"),
    (["--teachers", "a", "b", "--students", "c", "d", "--recipe", "official"], "suspend", "own"),
    (["--topology", "1T2S", "--recipe", "official", "--paused-teacher", "suspend", "--pair-epsilon", "own"],
     "suspend", "own"),
    (["--topology", "2T1S", "--paused-teacher", "zero-step", "--pair-epsilon", "other-pair"],
     "zero-step", "other-pair"),
])
def test_released_script_defaults(argv, paused_teacher, pair_epsilon):
    args = train_multi.parse_args(argv)
    assert (args.paused_teacher, args.pair_epsilon, args.switch_rule) == (paused_teacher, pair_epsilon, "text")


def test_other_pair_epsilon_needs_two_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        train_multi.parse_args(["--teachers", "a", "--students", "b", "--pair-epsilon", "other-pair"])
    assert e.value.code == 2 and "two teacher-student pairs" in capsys.readouterr().err


def test_epsilon_sources():
    stats = torch.tensor([[0.9, 1.2, 0.4], [0.3, 0.5, 0.7]])
    assert torch.equal(train_multi.epsilon_sources(stats, "own"), stats)
    assert torch.equal(train_multi.epsilon_sources(stats, "other-pair"), stats[[1, 1]])


@pytest.mark.parametrize("argv", [[], ["--teachers", "wrn_16_1"], ["--students", "resnet20"]])
def test_missing_networks_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train_multi.parse_args(argv)
    assert e.value.code == 2 and "--topology" in capsys.readouterr().err


def test_unknown_network_rejected(tmp_path):
    with pytest.raises(utils.UsageError, match="no_such_net"):
        train_multi.main(tiny(tmp_path, "--teachers", "no_such_net", "--students", "resnet20"))


# --------------------------------------------------------------------------- runs with scripted modes

def scripted_modes(monkeypatch, module, modes, snapshots=None):
    """Replace ``module.switching_decision``: the real delta, the modes from ``modes``.

    ``modes[i]`` holds iteration i's expert flag of each pair (one decision of every pair per
    iteration). When ``snapshots`` is a list, the parameters and optimiser states of every
    network are copied into it at the start of each ``module.train_step``, i.e. after the
    previous iteration's step.
    """
    calls = itertools.count()

    def decide(stats, *args, **kwargs):
        delta, expert = REAL_DECISION(stats, *args, **kwargs)
        scripted = torch.tensor(modes[next(calls)], device=expert.device)
        assert scripted.numel() == expert.numel()
        return delta, scripted.reshape(expert.shape)
    monkeypatch.setattr(module, "switching_decision", decide)
    if snapshots is not None:
        step = module.train_step

        def snapshot_then_step(nets, optimizers, *args, **kwargs):
            snapshots.append(network_states(nets, optimizers))
            return step(nets, optimizers, *args, **kwargs)
        monkeypatch.setattr(module, "train_step", snapshot_then_step)


def network_states(nets, optimizers):
    return {role: ({k: v.detach().clone() for k, v in nets[role].named_parameters()},
                   clone_state(optimizers[role].state_dict()["state"])) for role in nets}


def clone_state(obj):
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


def same(a, b):
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def final_states(run_dir, roles):
    ckpt = torch.load(run_dir / "last.pt", weights_only=False)
    states = {}
    for role in roles:
        model = ckpt["models"][role]
        params = {k: v for k, v in model.items() if "running" not in k and "num_batches" not in k}
        states[role] = (params, ckpt["optimizers"][role]["state"])
    return states


def test_one_teacher_one_student_takes_the_same_steps_as_switokd(tmp_path, monkeypatch):
    modes = [(False,), (True,), (True,), (False,)]  # both modes, both transitions
    nets = ["--student", "resnet20", "--teacher", "wrn_16_1"]
    scripted_modes(monkeypatch, train_switokd, modes)
    train_switokd.main(tiny(tmp_path, *nets))
    scripted_modes(monkeypatch, train_multi, modes)
    results = train_multi.main(tiny(tmp_path, "--students", "resnet20", "--teachers", "wrn_16_1"))

    ours = torch.load(tmp_path / "switokd_multi" / "r" / "last.pt", weights_only=False)
    theirs = torch.load(tmp_path / "switokd" / "r" / "last.pt", weights_only=False)
    assert ours["models"].keys() == theirs["models"].keys() == {"student", "teacher"}
    for role in ("student", "teacher"):
        assert ours["models"][role].keys() == theirs["models"][role].keys()
        for name, tensor in theirs["models"][role].items():
            assert torch.equal(ours["models"][role][name], tensor), (role, name)
        assert same(ours["optimizers"][role], theirs["optimizers"][role])
    assert results["expert_fraction"] == {"teacher-student": 0.5}
    assert results["paused_fraction"] == {"teacher": 0.5}
    # the same trace, column for column
    ours = np.load(tmp_path / "switokd_multi" / "r" / "switching.npz")
    theirs = np.load(tmp_path / "switokd" / "r" / "switching.npz")
    assert ours["expert"].tolist() == [[0], [1], [1], [0]] and theirs["expert"].tolist() == [0, 1, 1, 0]
    for key in ("G", "delta", "ps_y", "pt_y"):
        np.testing.assert_array_equal(ours[key][:, 0], theirs[key], err_msg=key)
    student, teacher = results["trace_columns"]["networks"].index(S), results["trace_columns"]["networks"].index(T)
    for key in ("ce", "kl"):
        np.testing.assert_array_equal(ours[key][:, student], theirs[f"student_{key}"], err_msg=key)
        np.testing.assert_array_equal(ours[key][:, teacher][~theirs["expert"].astype(bool)],
                                      theirs[f"teacher_{key}"][~theirs["expert"].astype(bool)], err_msg=key)


@pytest.mark.parametrize("teachers, students, modes, moved", [
    # 1T2S: the teacher is paused only when both of its pairs are in expert mode.
    (["wrn_16_1"], ["resnet20", "resnet20"],
     [(False, False), (True, False), (True, True), (False, True)],
     {T1: [True, True, False, True]}),
    # 2T1S: each teacher follows its own pair.
    (["wrn_16_1", "resnet20"], ["resnet20"],
     [(False, False), (True, False), (True, True), (False, True)],
     {T1: [True, False, False, True], T2: [True, True, False, False]}),
])
def test_teachers_pause_as_their_pairs_say(tmp_path, monkeypatch, teachers, students, modes, moved):
    snapshots = []
    scripted_modes(monkeypatch, train_multi, modes, snapshots)
    results = train_multi.main(tiny(tmp_path, "--teachers", *teachers, "--students", *students))
    roles = list(results["networks"])
    snapshots.append(final_states(tmp_path / "switokd_multi" / "r", roles))
    assert len(snapshots) == ITERATIONS + 1

    for role in roles:
        for i in range(ITERATIONS):
            (params_before, opt_before), (params_after, opt_after) = snapshots[i][role], snapshots[i + 1][role]
            expected = moved.get(role, [True] * ITERATIONS)[i]  # students always learn
            # A paused teacher is bit-identical, optimiser state included; any other network stepped.
            assert same(params_before, params_after) is not expected, (role, i)
            assert same(opt_before, opt_after) is not expected, (role, i)

    trace = np.load(tmp_path / "switokd_multi" / "r" / "switching.npz")
    assert trace["expert"].tolist() == [list(map(int, m)) for m in modes]
    paused = [[not moved[t][i] for t in results["teachers"]] for i in range(ITERATIONS)]
    assert trace["paused"].astype(bool).tolist() == paused
    kl = trace["kl"][:, roles.index(T1)]
    assert all((kl[i] == 0) == (not moved[T1][i]) for i in range(ITERATIONS))


def test_official_zero_step_moves_a_paused_teacher(tmp_path, monkeypatch):
    snapshots = []
    modes = [(False, False), (True, True)]
    scripted_modes(monkeypatch, train_multi, modes, snapshots)
    train_multi.main(tiny(tmp_path, "--teachers", "wrn_16_1", "--students", "resnet20", "resnet20",
                          "--paused-teacher", "zero-step", iterations=2))
    assert len(snapshots) == 2
    params_before, opt_before = snapshots[1][T1]
    params_after, opt_after = final_states(tmp_path / "switokd_multi" / "r", [T1])[T1]
    assert not same(params_before, params_after)  # weight decay and Adam's moments still move it
    assert opt_after[0]["step"] == opt_before[0]["step"] + 1


# --------------------------------------------------------------------------- end to end

def check_run_directory(run_dir, results, roles, pairs, teachers, epochs, iterations):
    for name in ["last.pt", "metrics.jsonl", "results.json", "args.json", "switching.npz",
                 *(f"best_{role}.pt" for role in roles)]:
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert list(on_disk["networks"]) == roles and on_disk["topology"] == results["topology"]
    assert set(on_disk["expert_fraction"]) == set(pairs) and set(on_disk["paused_fraction"]) == set(teachers)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    for pair in pairs:
        assert 0 <= rows[-1][f"switch/{pair}/expert_fraction"] <= 1
        assert f"train/{pair}/G" in rows[-1] and f"train/{pair}/delta" in rows[-1]
    for t in teachers:
        assert 0 <= rows[-1][f"switch/{t}/paused_fraction"] <= 1
    trace = np.load(run_dir / "switching.npz")
    n = results["iterations"]
    assert n == epochs * iterations
    assert trace["G"].shape == trace["delta"].shape == trace["expert"].shape == (n, len(pairs))
    assert trace["paused"].shape == (n, len(teachers)) and trace["ce"].shape == (n, len(roles))
    assert trace["epoch"].tolist() == [e for e in range(1, epochs + 1) for _ in range(iterations)]
    # Each teacher is paused exactly when all its pairs are in expert mode.
    for j, t in enumerate(teachers):
        columns = [i for i, pair in enumerate(pairs) if pair.startswith(t + "-")]
        assert np.array_equal(trace["paused"][:, j].astype(bool), trace["expert"][:, columns].all(axis=1))
    expert_fraction = trace["expert"].mean(axis=0)
    assert [on_disk["expert_fraction"][p] for p in pairs] == pytest.approx(expert_fraction.tolist())
    return on_disk


def test_1t2s_end_to_end(tmp_path):
    results = train_multi.main(tiny(tmp_path, "--topology", "1T2S", "--teachers", "wrn_16_1",
                                    "--students", "resnet20", "wrn_16_1", "--epochs", "2", iterations=2))
    on_disk = check_run_directory(tmp_path / "switokd_multi" / "r", results, [S1, S2, T1],
                                  ["teacher1-student1", "teacher1-student2"], [T1], 2, 2)
    assert on_disk["topology"] == "1T2S"
    assert {r: n["arch"] for r, n in on_disk["networks"].items()} == {S1: "resnet20", S2: "wrn_16_1",
                                                                      T1: "wrn_16_1"}


def test_2t1s_end_to_end_with_the_official_recipe(tmp_path):
    results = train_multi.main(tiny(tmp_path, "--teachers", "wrn_16_1", "resnet20", "--students", "mobilenet",
                                    "--recipe", "official", iterations=2))
    run_dir = tmp_path / "switokd_multi" / "r"
    on_disk = check_run_directory(run_dir, results, [S1, T1, T2],
                                  ["teacher1-student1", "teacher2-student1"], [T1, T2], 1, 2)
    assert on_disk["topology"] == "2T1S"
    assert {k: on_disk["switching"][k] for k in ("switch_rule", "paused_teacher", "pair_epsilon")} == \
        {"switch_rule": "text", "paused_teacher": "suspend", "pair_epsilon": "other-pair"}
    # The released 2T1S script: teachers SGD lr 0.1, the MobileNet student Adam lr 0.01 (re-drawn weights).
    groups = {role: o["param_groups"][0] for role, o in torch.load(run_dir / "last.pt", weights_only=False)
              ["optimizers"].items()}
    for role in (T1, T2):
        assert groups[role]["initial_lr"] == 0.1 and "nesterov" in groups[role]
        assert on_disk["networks"][role]["optimizer"] == "sgd" and on_disk["networks"][role]["lr"] == 0.1
    assert groups[S1]["initial_lr"] == 0.01 and "amsgrad" in groups[S1]
    assert (on_disk["networks"][S1]["optimizer"], on_disk["networks"][S1]["script_init"]) == ("adam", "official")
    assert all(n["lr_drop"] == "start" and n["variant"] == "official" for n in on_disk["networks"].values())
    # the first pair's epsilon comes from the second pair's distances
    trace = np.load(run_dir / "switching.npz")
    d_s, d_t = trace["ps_y"], trace["pt_y"]
    expected = d_s[:, 0] - np.exp(-d_t[:, 1] / (d_s[:, 1] + d_t[:, 1])) * d_t[:, 0]
    np.testing.assert_allclose(trace["delta"][:, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(trace["delta"][:, 1], d_s[:, 1] - np.exp(-d_t[:, 1] / (d_s[:, 1] + d_t[:, 1]))
                               * d_t[:, 1], rtol=1e-5)


def test_resume_continues_exactly(tmp_path, interrupted_after):
    """1T2S stopped after epoch 1 and resumed: the same weights, trace and metrics as one run."""
    nets = ["--teachers", "wrn_16_1", "--students", "resnet20", "resnet20", "--epochs", "2"]
    train_multi.main([*tiny(tmp_path / "straight", *nets, iterations=2)])
    with interrupted_after(1):
        train_multi.main(tiny(tmp_path / "resumed", *nets, iterations=2))
    train_multi.main(tiny(tmp_path / "resumed", *nets, "--resume", iterations=2))
    runs = [tmp_path / name / "switokd_multi" / "r" for name in ("straight", "resumed")]
    (a, b) = (torch.load(run / "last.pt", weights_only=False) for run in runs)
    assert same(a["models"], b["models"]) and same(a["optimizers"], b["optimizers"])
    assert [{k: v for k, v in row.items() if not k.startswith("time/")} for row in a["history"]] == \
        [{k: v for k, v in row.items() if not k.startswith("time/")} for row in b["history"]]
    (ta, tb) = (np.load(run / "switching.npz") for run in runs)
    assert set(ta.files) == set(tb.files) >= {"G", "delta", "ps_y", "pt_y", "expert", "paused", "ce", "kl", "epoch"}
    for key in set(ta.files) - {"seconds"}:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)


def test_one_pair_takes_the_two_network_scripts_recipe(tmp_path):
    flags = ["--recipe", "official", "--epochs", "1"]
    multi = train_multi.main(tiny(tmp_path, "--teachers", "wrn_16_1", "--students", "mobilenetv2_0.5", *flags,
                                  iterations=1))
    pair = train_switokd.main(tiny(tmp_path, "--teacher", "wrn_16_1", "--student", "mobilenetv2_0.5", *flags,
                                   iterations=1))
    assert multi["networks"] == pair["networks"]


def test_script_init_alone_redraws_only_what_a_released_script_redraws(tmp_path):
    results = train_multi.main(tiny(tmp_path, "--teachers", "wrn_16_1", "resnet20", "--students", "mobilenet",
                                    "--script-init", "official", iterations=1))
    assert {role: n["script_init"] for role, n in results["networks"].items()} == \
        {S1: "official", T1: "none", T2: "none"}
    assert results["networks"][S1]["optimizer"] == "adam" and results["networks"][T1]["lr_drop"] == "after"

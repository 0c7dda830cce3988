"""The CUDA paths (marker ``cuda``; skipped, with the reason, where no GPU is present).

``python -m pytest -m cuda`` runs only these; ``scripts/gpu_check.sh`` runs them first on a GPU
machine. Each asserts behaviour: what a step changes, how close the reduced precisions come to
fp32, what the loader draws, that a resumed deterministic run is the straight one, how often an
iteration waits for the host, that what CUDA saved loads on the CPU.
"""
import copy
import json
import warnings

import pytest
import torch

import datasets
import evaluate
import models
import train_dml
import train_kdcl
import train_switokd
import utils

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="no CUDA device (scripts/gpu_check.sh runs these on a GPU)")]

TINY = ["--dataset", "synthetic", "--train-subset", "64", "--test-subset", "32", "--batch-size", "16",
        "--workers", "0", "--no-progress", "--device", "cuda", "--student", "wrn_10_1", "--teacher", "wrn_16_1"]
LEARNING, EXPERT = ["--no-switching"], ["--switch-rule", "algorithm1", "--fixed-delta", "0"]


def switokd(tmp_path, *flags, name="r"):
    return train_switokd.main([*TINY, "--out", str(tmp_path), "--run-name", name, *flags])


def step_setup(amp=None, seed=0):
    """Two networks on the GPU, their optimisers, one batch, a SwitOKD config and a Precision."""
    torch.manual_seed(seed)
    student, teacher = models.build("wrn_10_1", 10).cuda(), models.build("wrn_16_1", 10).cuda()
    opt_s, opt_t = (torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in (student, teacher))
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(16, 3, 32, 32, generator=g).cuda()
    targets = torch.randint(0, 10, (16,), generator=g).cuda()
    return student, teacher, opt_s, opt_t, images, targets, utils.Precision(torch.device("cuda"), amp)


def config(*flags):
    return train_switokd.parse_args([*TINY, *flags])


def test_fp16_expert_iteration_leaves_the_teacher_alone():
    student, teacher, opt_s, opt_t, images, targets, precision = step_setup("fp16")
    before = copy.deepcopy(teacher.state_dict())
    scale = precision.scaler.get_scale()
    values = train_switokd.train_step(student, teacher, opt_s, opt_t, images, targets, config(*EXPERT), precision)
    assert values["expert"] == 1.0
    after = teacher.state_dict()
    for key, value in before.items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm statistics move, as in the release
            assert torch.equal(value, after[key]), key
    assert opt_t.state_dict()["state"] == {}   # never stepped: no momentum buffer
    assert opt_s.state_dict()["state"]         # the student stepped
    found_inf = sum(v.item() for v in precision.scaler._found_inf_per_device(opt_s).values())
    assert precision.scaler.get_scale() == (scale * 0.5 if found_inf else scale)  # halved on overflow only


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_reduced_precision_learning_iterations_are_close_to_fp32(amp):
    losses = {}
    for name in (None, amp):
        student, teacher, opt_s, opt_t, images, targets, precision = step_setup(name)
        losses[name] = train_switokd.train_step(student, teacher, opt_s, opt_t, images, targets, config(*LEARNING),
                                                precision)
    for key in ("student_ce", "student_kl", "teacher_ce", "teacher_kl"):
        assert torch.isfinite(torch.tensor(losses[amp][key]))
        assert losses[amp][key] == pytest.approx(losses[None][key], rel=0.05, abs=2e-3), key


@pytest.mark.parametrize("name", ["wrn_16_2", "resnet20", "mobilenetv2_0.5"])
def test_channels_last_gives_the_same_logits(name):
    torch.manual_seed(0)
    net = models.build(name, 10).cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        plain = net(x)
        nhwc = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc, plain, rtol=1e-3, atol=1e-3)


def test_tensor_loader_draws_the_same_batches_on_cuda_as_on_the_cpu():
    bundle = datasets.build("synthetic", train_subset=64, test_subset=32)
    batches = {}
    for device in ("cpu", "cuda"):
        loaders = datasets.make_loaders(bundle, 16, 16, loader="tensor", device=device, seed=3)
        loaders.train.set_epoch(2)
        batches[device] = [(x.cpu(), y.cpu()) for x, y in loaders.train]
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(batches["cpu"], batches["cuda"]):
        assert torch.equal(y_cpu, y_gpu)
        torch.testing.assert_close(x_gpu, x_cpu, rtol=0, atol=1e-6)


def test_deterministic_cuda_run_resumed_is_the_straight_run(tmp_path, interrupted_after):
    straight = switokd(tmp_path, "--epochs", "2", "--deterministic", name="straight")
    with interrupted_after(1):
        switokd(tmp_path, "--epochs", "2", "--deterministic", name="resumed")
    resumed = switokd(tmp_path, "--epochs", "2", "--deterministic", "--resume", name="resumed")
    assert resumed["networks"]["student"]["final_top1"] == straight["networks"]["student"]["final_top1"]
    a, b = (torch.load(tmp_path / "switokd" / n / "last.pt", weights_only=False)["models"]
            for n in ("straight", "resumed"))
    for role in a:
        for key in a[role]:
            assert torch.equal(a[role][key], b[role][key]), (role, key)


def synchronisations(step) -> int:
    """How many times ``step()`` waits for the device (torch's sync debug mode warns at each)."""
    step()  # warm-up: lazy initialisation, cuDNN autotuning
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("mode", [LEARNING, EXPERT])
def test_a_switokd_iteration_waits_for_the_host_once(mode):
    student, teacher, opt_s, opt_t, images, targets, precision = step_setup()
    cfg = config(*mode)
    assert synchronisations(lambda: train_switokd.train_step(student, teacher, opt_s, opt_t, images, targets, cfg,
                                                             precision)) == 1


def test_the_baselines_never_wait_for_the_host():
    student, teacher, opt_s, opt_t, images, targets, precision = step_setup()
    nets, optimizers = {"student": student, "teacher": teacher}, {"student": opt_s, "teacher": opt_t}
    assert synchronisations(lambda: train_dml.train_step(nets, optimizers, images, targets, 1.0, precision)) == 0
    views = torch.cat([images, images.flip(3)])  # KDCL: one view per network, view-major
    assert synchronisations(lambda: train_kdcl.train_step(nets, optimizers, views, targets, 2, "minlogit", None,
                                                          2.0, 1.0, precision)) == 0


def test_what_cuda_saved_loads_and_evaluates_on_the_cpu(tmp_path, capsys):
    results = switokd(tmp_path, "--epochs", "1")
    run_dir = tmp_path / "switokd" / "r"
    student = models.load(run_dir / "best_student.pt")
    assert next(student.parameters()).device.type == "cpu"
    report = evaluate.main([str(run_dir), "--device", "cpu", "--json"])
    for role in ("student", "teacher"):
        recorded = results["networks"][role]["best_top1"]
        assert abs(report["networks"][role]["top1"] - recorded) <= 100 / 32 + 1e-6  # at most one image differs
    assert json.loads((run_dir / "results.json").read_text())["settings"]["device"].startswith("cuda")

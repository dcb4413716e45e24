"""The supernet on the fused kernels (``Supernet(kernels="fused")``) against the eager path.

The fused path reads the arch from device data and runs one static launch sequence; the eager path
(``bnao.ops.cell.mixed_cell``) schedules the branches on the host. Both must train the same supernet.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES

from bnao.data import create_dataset, create_loader
from bnao.sampling import create_sampler
from bnao.space import NAOSpace
from bnao.supernet import Supernet, SupernetTrainer
from bnao.supernet.fused_forward import FusedKernelsUnavailable, fused_built
from bnao.supernet.launches import compare_launch_sequences


def _require_fused(device: str) -> None:
    if not fused_built(torch.device(device).type):
        pytest.skip(f"the fused-cell ops are not built for {device}")


def _pair(space, device, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    eager = Supernet(space, layers=1, channels=4, num_classes=3, in_channels=2, kernels="eager", seed=7, **kw)
    eager = eager.to(device=device, dtype=dtype)
    fused = copy.deepcopy(eager)
    fused.kernels = "fused"
    return eager, fused


def _grads(model):
    # The fused path gives every parameter a dense gradient; the eager one leaves unused ones None.
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_set", ["small", "middle"])
def test_fused_training_step_equals_eager(device, op_set):
    _require_fused(device)
    space = NAOSpace(op_set=op_set)
    eager, fused = _pair(space, device, drop_path_keep_prob=0.6, total_steps=10, auxiliary=True)
    for model in (eager, fused):
        model.set_step(4)  # drop-path active: both draw the same masks from the same seeded generator
    images = torch.randn(6, 2, 8, 8, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    for arch in space.sample_array(4, np.random.default_rng(3)):
        arch = tuple(arch.tolist())
        outputs = []
        for model in (eager, fused):
            model.zero_grad(set_to_none=True)
            logits, aux = model(images, arch)
            (F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(aux, labels)).backward()
            outputs.append((logits.detach(), aux.detach()))
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-10)
        for g_fused, g_eager in zip(_grads(fused), _grads(eager)):
            torch.testing.assert_close(g_fused, g_eager, rtol=1e-8, atol=1e-10)
        for b_fused, b_eager in zip(fused.buffers(), eager.buffers()):
            torch.testing.assert_close(b_fused, b_eager, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_candidate_evaluation_equals_eager(device):
    _require_fused(device)
    space = NAOSpace(op_set="middle")
    eager, fused = _pair(space, device)
    images = torch.randn(5, 2, 8, 8, dtype=torch.float64, device=device)
    for model in (eager, fused):
        model.eval()
    for arch in space.sample_array(3, np.random.default_rng(4)):
        arch = tuple(arch.tolist())
        with torch.no_grad():
            torch.testing.assert_close(fused(images, arch, bn_train=True), eager(images, arch, bn_train=True))


class _Float64Batches:
    """A loader's batches with float64 images (the trainer takes any iterable of batches)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return ((images.double(), labels) for images, labels in self.loader)

    def __len__(self):
        return len(self.loader)


def _trainer(kernels, device, steps, image_channels=3):
    space = NAOSpace(op_set="small")
    torch.manual_seed(0)
    model = Supernet(space, layers=1, channels=4, num_classes=4, drop_path_keep_prob=0.8, total_steps=steps,
                     kernels=kernels, in_channels=image_channels).to(device=device, dtype=torch.float64)
    pool = space.sample_array(6, 3)
    sampler = create_sampler("proportional", np.arange(1, 7, dtype=np.float64), seed=5)
    data = create_dataset("synthetic", num_samples=64, image_shape=(8, 8, image_channels), num_classes=4)
    loader = create_loader("tensor", data, 8, device=device, augment=True, shuffle=True, drop_last=True, seed=1)
    return SupernetTrainer(model, sampler, pool, _Float64Batches(loader), steps_total=steps, lr_max=0.05,
                           device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_300_fused_steps_follow_the_eager_ones(device):
    """300 float64 steps of a tiny supernet (drop-path on, masked SGD).

    The paths differ only in the order of floating-point sums. Measured on this net, the largest weight
    difference grows from 2e-16 after one step to 2e-13 after 20, 3e-8 after 100 and 6e-6 after 200: the
    training is chaotic (BatchNorm over 32 values, ReLU and max-pool switches) and amplifies rounding about
    tenfold every 15 steps, so the losses of the last steps differ by up to 1.5e-4. On an H200 (eager cells on
    cuDNN) the first loss beyond 1e-3 came at step 232 (3e-3 at most by step 300). Hence two bounds: the
    first 20 losses within 1e-6 (the trainer reports float32 losses; a semantic difference, such as a
    wrong weight row, statistic, mask or update, moves the loss by far more) and all 300 within 1e-3 on the
    CPU, the first 150 on CUDA.
    All 300 steps count for the last check: slots that no arch used stay bit-identical.

    On one CPU thread: the eager path's own results depend on the thread count (oneDNN's convolutions; on two
    threads its losses move by 6e-2 from its one-thread run by step 300), the fused kernels' do not
    (:func:`test_fused_steps_do_not_depend_on_the_thread_count`)."""
    _require_fused(device)
    steps = 300
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kernels in ("eager", "fused"):
            trainer = _trainer(kernels, device, steps)
            initial = {name: p.detach().clone() for name, p in trainer.model.slot_params.items()}
            losses = [trainer.train_steps(1)["loss"] for _ in range(steps)]
            runs[kernels] = (trainer, initial, np.array(losses))
    finally:
        torch.set_num_threads(threads)
    (eager, initial, eager_losses), (fused, initial_f, fused_losses) = runs["eager"], runs["fused"]
    np.testing.assert_allclose(fused_losses[:20], eager_losses[:20], rtol=0, atol=1e-6)
    compared = steps if device == "cpu" else 150
    np.testing.assert_allclose(fused_losses[:compared], eager_losses[:compared], rtol=0, atol=1e-3)
    np.testing.assert_array_equal(fused.counts, eager.counts)  # the same archs were drawn
    for name, p in fused.model.slot_params.items():
        rows_never_used = (eager.model.slot_params[name].detach() == initial[name]).flatten(1).all(1)
        assert rows_never_used.any(), name  # the check below is not vacuous
        assert torch.equal(p.detach()[rows_never_used], initial_f[name][rows_never_used]), name


def test_fused_steps_do_not_depend_on_the_thread_count():
    """The CPU kernels (at::parallel_for, OpenMP) sum every output in a fixed order whatever the threads:
    30 float64 steps on one and on two threads give bit-identical losses and weights."""
    _require_fused("cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            trainer = _trainer("fused", "cpu", 30)
            losses = [trainer.train_steps(1)["loss"] for _ in range(30)]
            results.append((losses, [p.detach().clone() for p in trainer.model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    (losses_1, weights_1), (losses_2, weights_2) = results
    assert losses_1 == losses_2
    assert all(torch.equal(a, b) for a, b in zip(weights_1, weights_2))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_steps_on_one_channel_images(device):
    # A one-channel NCHW batch also has channels-last strides, so the stem's output may come out
    # channels-last; the fused cells must still take it (Fashion-MNIST is one-channel).
    _require_fused(device)
    losses = {}
    for kernels in ("eager", "fused"):
        trainer = _trainer(kernels, device, 20, image_channels=1)
        losses[kernels] = [trainer.train_steps(1)["loss"] for _ in range(5)]
    np.testing.assert_allclose(losses["fused"], losses["eager"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_launch_sequence_is_the_same_for_every_arch(device, bf16):
    _require_fused(device)
    space = NAOSpace(op_set="middle")
    _, fused = _pair(space, device, dtype=torch.float32, drop_path_keep_prob=0.8, total_steps=5)
    images = torch.randn(4, 2, 8, 8, device=device)
    labels = torch.tensor([0, 1, 2, 0], device=device)
    archs = [tuple(a.tolist()) for a in space.sample_array(20, np.random.default_rng(5))]
    result = compare_launch_sequences(fused, images, labels, archs, bf16=bf16)
    assert result["identical"], result
    if bf16:  # the autocast casts are recorded too: a longer sequence than float32's
        assert result["ops_min"] > compare_launch_sequences(fused, images, labels, archs[:1])["ops_min"]


def test_fused_where_not_built_is_a_clear_error(monkeypatch):
    import bnao.supernet.fused_forward as fused_module

    monkeypatch.setattr(fused_module, "fused_built", lambda device_type: False)
    _, fused = _pair(NAOSpace(), "cpu")
    with pytest.raises(FusedKernelsUnavailable, match="kernels='auto'"):
        fused(torch.randn(2, 2, 8, 8, dtype=torch.float64), NAOSpace().sample_array(1, 0)[0])
    with pytest.raises(ValueError, match="kernels must be one of"):
        Supernet(NAOSpace(), layers=1, channels=4, kernels="fast")


@pytest.mark.parametrize("device", DEVICES)
def test_top_kernels_counts_the_fused_ops_of_a_step(device):
    """``bnao profile --top-kernels``: where a step's time goes. On a CPU the rows are ops, and the fused
    ops' calls per step are a hand count: N=1 gives 3 normal + 2 reduction cells of B=5 nodes, so 25 nodes,
    each with two forward rounds, one backward per round (round 1's accumulating) and one node output."""
    _require_fused(device)
    from bnao.supernet.profiling import format_result, profile_supernet

    result = profile_supernet(device=device, kernels="fused", layers=1, channels=4, batch_size=4, steps=2, warmup=1,
                              pool_size=5, count_ops=False, sequence_archs=0, top=100, eval_archs=2, eval_batch=8)
    for key, unit in (("top_kernels", "step"), ("top_eval_kernels", "arch")):
        table = result[key]
        rows = table["rows"]
        times = [row["ms"] for row in rows]
        assert table["unit"] == unit and rows and times == sorted(times, reverse=True) and table["total_ms"] > 0
        assert all(abs(row["share"] - row["ms"] / table["total_ms"]) < 1e-9 for row in rows)
        # Profiler ranges span kernels (on the H200 "bnao::forward" once topped the CUDA table): never rows.
        assert not [row["name"] for row in rows if row["name"] in ("bnao::forward", "bnao::backward", "bnao::optimizer")
                    or row["name"].startswith("Optimizer.")]
    # Three rows kept: their shares are of the total over every op, so they sum to less than 1; and the ops'
    # own times add up to no more than the run's wall time (measured outside).
    import time

    from bnao.supernet.profiling import top_kernels

    model = Supernet(NAOSpace(op_set="small"), layers=1, channels=4, num_classes=3, kernels="fused").to(device)
    images = torch.randn(4, 3, 8, 8, device=device)
    arch = tuple(NAOSpace(op_set="small").sample_array(1, 0)[0].tolist())
    with torch.no_grad():
        model(images, arch, bn_train=True)  # warm-up
        start = time.perf_counter()
        def forward():
            model(images, arch, bn_train=True)
            if device == "cuda":
                torch.cuda.synchronize()

        three = top_kernels(forward, torch.device(device), 1, "forward", top=3)
        wall_ms = 1000 * (time.perf_counter() - start)
    assert len(three["rows"]) == 3 and 0 < sum(row["share"] for row in three["rows"]) < 1
    assert 0 < three["total_ms"] <= wall_ms
    if device == "cpu":
        calls = {row["name"]: row["calls"] for row in result["top_kernels"]["rows"]}
        assert calls["bnao::branch_round"] == 50
        assert calls["bnao::branch_round_backward"] == 25 and calls["bnao::branch_round_backward_accumulate"] == 25
        assert calls["bnao::node_output"] == 25 and calls["bnao::node_output_backward"] == 25
        # An evaluated arch: the forward only, each of the 5 cells' combine once, its 25 nodes' rounds.
        calls = {row["name"]: row["calls"] for row in result["top_eval_kernels"]["rows"]}
        assert calls["bnao::branch_round"] == 50 and calls["bnao::combine"] == 5
        assert "bnao::branch_round_backward" not in calls
    text = format_result(result)
    assert "per training step" in text and "per evaluated arch" in text

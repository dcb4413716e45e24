"""Every CUDA path of bnao against its CPU counterpart (marked ``cuda``: skipped without a GPU).

Run on a GPU machine by ``scripts/gpu-check.sh`` (``pytest -m cuda``). Each test
compares the CUDA result with something computed independently: the CPU run of
the same seed, the CPU kernel, a statistical bound, or the state before a step.

Training on CUDA against the CPU: runs of this small supernet are chaotic (on
the CPU, a 1e-7 relative change of the input grows to a 1e-3 change of the loss
within 8 steps), so two free runs cannot be compared at a meaningful tolerance.
Instead each of 20 steps starts both devices from the CPU run's exact state
(its checkpoint, moved to the GPU) and compares the step's loss and updated
weights. TF32 is off, so both devices compute in IEEE fp32 and differ only in
summation order and fused multiply-adds; stated tolerances: loss within 1e-4
relative, weights within 1e-5 + 1e-4 relative.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

from bnao import create_sampler
from bnao.data import AugmentConfig, create_dataset, create_loader
from bnao.space import NAOSpace
from bnao.supernet import MaskedSGD, Supernet, SupernetTrainer, evaluate_pool

pytestmark = pytest.mark.cuda
CUDA = torch.cuda.is_available()

STEPS = 20
LOSS_RTOL = 1e-4  # one step's loss, CUDA vs CPU from the same state
# Weights after that step. float32 rounding alone moves them: on the CPU, this set-up's float32 steps differ
# from the same steps in float64 by up to 1.25e-4 (stem.weight, steps 0-7; the BN backward's cancellations),
# so two float32 devices may differ by up to about twice that (CUDA vs CPU on an H200: 7.5e-5 at step 3).
WEIGHT_ATOL, WEIGHT_RTOL = 3e-4, 1e-4


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """TF32 off for the comparison (it rounds fp32 matmuls and convolutions to 10-bit mantissas)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FixedBatches:
    """The same batches on every device, with a resumable position (a loader whose order cannot differ)."""

    def __init__(self, batches, device):
        self.batches = [(x.to(device), y.to(device)) for x, y in batches]
        self.position = 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = int(state["position"])


def make_batches(count=5, batch=16, poison=None, seed=0):
    """CPU batches of CIFAR-shaped noise; batch ``poison`` holds a NaN pixel."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        if i == poison:
            x[0, 0, 0, 0] = float("nan")
        out.append((x, torch.randint(0, 10, (batch,), generator=gen)))
    return out


def build_trainer(device, batches=None, steps_total=STEPS, keep_prob=None, **trainer_kw):
    """A trainer of a small supernet over a pool of 6 archs, on fixed batches.

    Drop-path is off by default (CPU and CUDA mask generators differ by design); the slot update is
    ``freeze`` when the trainer offers it, so slots move only on steps that use them.

    Returns:
        ``(trainer, initial weights by name)``.
    """
    torch.manual_seed(0)
    space = NAOSpace(op_set="small")
    pool = space.sample_array(6, rng=1)
    model = Supernet(space, layers=1, channels=8, num_classes=10, drop_path_keep_prob=keep_prob, seed=0)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    model = model.to(device)
    sampler = create_sampler("uniform", len(pool), seed=3, device=device)
    kw = dict(trainer_kw)
    if "unused_slot_update" in inspect.signature(SupernetTrainer).parameters:
        kw["unused_slot_update"] = "freeze"
    loader = FixedBatches(batches if batches is not None else make_batches(), device)
    trainer = SupernetTrainer(model, sampler, pool, loader, steps_total=steps_total, device=device, seed=0, **kw)
    return trainer, initial


def train_supernet(device, steps=STEPS, batches=None, perturb=0.0, keep_prob=None, **trainer_kw):
    """Trains :func:`build_trainer`'s supernet ``steps`` steps; returns (trainer, initial weights, losses)."""
    batches = batches if batches is not None else make_batches()
    if perturb:
        batches = [(x * (1 + perturb), y) for x, y in batches]
    trainer, initial = build_trainer(device, batches, steps_total=max(steps, 1), keep_prob=keep_prob, **trainer_kw)
    losses = [trainer.train_steps(1)["loss"] for _ in range(steps)]
    return trainer, initial, np.asarray(losses)


def never_used_rows(trainer):
    """``name -> bool mask of the elements no drawn arch used`` (union of the archs' touched masks)."""
    model = trainer.model
    params = dict(model.named_parameters())
    used = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in params.items()}
    for idx in np.flatnonzero(trainer.draw_counts()):
        masks = model.touched_masks(tuple(trainer.pool[idx].tolist()))
        for name, param in params.items():
            mask = masks.get(param)
            if mask is None:  # used entirely
                used[name][...] = True
            elif mask is not False:
                used[name] |= (mask > 0).expand(param.shape).cpu()
    return {name: ~u for name, u in used.items() if (~u).any()}


def compare_steps(reference, other, steps):
    """Runs ``steps`` steps of ``reference``; before each, ``other`` takes its exact state; compares the step."""
    for step in range(steps):
        # A deep copy, as a checkpoint file would be: loading a live state on the same device aliases its buffers.
        other.load_state_dict(copy.deepcopy(reference.state_dict()))
        want, got = reference.train_steps(1)["loss"], other.train_steps(1)["loss"]
        assert abs(got - want) <= LOSS_RTOL * abs(want), (step, got, want)
        mine = dict(other.model.named_parameters())
        for name, param in reference.model.named_parameters():
            torch.testing.assert_close(mine[name].detach().cpu(), param.detach().cpu(), atol=WEIGHT_ATOL,
                                       rtol=WEIGHT_RTOL, msg=lambda m: f"step {step}, {name}: {m}")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_supernet_training_cuda_matches_cpu():
    cpu, _ = build_trainer("cpu")
    cuda, _ = build_trainer("cuda")
    compare_steps(cpu, cuda, STEPS)
    assert np.array_equal(cpu.draw_counts(), cuda.draw_counts())  # one sampler stream on both devices


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_slots_never_used_stay_bit_identical_on_cuda():
    trainer, initial, losses = train_supernet("cuda")
    assert np.isfinite(losses).all()
    unused = never_used_rows(trainer)
    assert unused, "every slot was used: the check would be empty"
    params = dict(trainer.model.named_parameters())
    for name, rows in unused.items():
        assert torch.equal(params[name].detach().cpu()[rows], initial[name][rows]), name


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_poisoned_step_is_skipped_on_cuda():
    """Both devices skip the same poisoned step entirely (weights and momentum untouched) and go on."""
    poisoned = make_batches(poison=2)
    for device in ("cpu", "cuda"):
        trainer, _, _ = train_supernet(device, steps=2, batches=poisoned)
        before = copy.deepcopy(trainer.state_dict())
        stats = trainer.train_steps(1)  # the third batch: NaN in the images
        assert stats["bad_steps"] == 1 and trainer.bad_steps_total == 1, device
        for name, param in trainer.model.named_parameters():
            assert torch.equal(param.detach().cpu(), before["model"][name].cpu()), (device, name)
        after = trainer.optimizer.state_dict()["state"]
        for key, value in before["optimizer"]["state"].items():
            if "momentum_buffer" in value:
                assert torch.equal(after[key]["momentum_buffer"].cpu(), value["momentum_buffer"].cpu()), (device, key)
        assert trainer.train_steps(3)["bad_steps"] == 0 and trainer.bad_in_row == 0  # good steps apply again


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_nonfinite_flag_waits_on_the_trainer_device_stream(monkeypatch):
    """The eager step's flag event is recorded on the trainer's device stream, whatever the current device is.

    graph='off': the device-data (graph) step, the default on CUDA, reads its flag by a blocking copy instead.
    """
    import bnao.supernet.trainer as trainer_module

    recorded = []

    class RecordingEvent(torch.cuda.Event):
        def record(self, stream=None):
            recorded.append(stream)
            return super().record(stream)

    monkeypatch.setattr(trainer_module.torch.cuda, "Event", RecordingEvent)
    trainer, _, _ = train_supernet("cuda", steps=1, graph="off")
    assert trainer.graph_status["mode"] == "eager"
    index = trainer.device.index if trainer.device.index is not None else torch.cuda.current_device()
    assert recorded and all(s is not None and s.device == torch.device("cuda", index) for s in recorded)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_poisoned_step_skipped_on_second_gpu():
    """With the current device cuda:0, a trainer on cuda:1 skips a poisoned step and applies good ones."""
    torch.cuda.set_device(0)
    trainer, _, _ = train_supernet("cuda:1", steps=2, batches=make_batches(poison=2))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.train_steps(1)["bad_steps"] == 1
    assert all(torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
    assert trainer.train_steps(1)["bad_steps"] == 0
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_evaluate_pool_cuda_matches_cpu():
    trainer, _, _ = train_supernet("cpu", steps=5)
    model = trainer.model.eval()
    archs = NAOSpace(op_set="small").sample_array(24, rng=5)
    x, y = make_batches(count=1, batch=100, seed=9)[0]
    acc_cpu, loss_cpu = evaluate_pool(model, archs, (x, y))
    model.cuda()
    acc_cuda, loss_cuda = evaluate_pool(model, archs, (x.cuda(), y.cuda()))
    np.testing.assert_allclose(loss_cuda, loss_cpu, rtol=1e-4)
    # An image whose top two logits tie to 1e-5 may flip: at most one per arch.
    assert np.abs(acc_cuda - acc_cpu).max() <= 1 / 100 + 1e-12


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_masked_sgd_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    shapes = [(12, 5, 3), (7, 4), (9,)]
    initial = [torch.randn(s, generator=gen) for s in shapes]
    params = {d: [torch.nn.Parameter(t.to(d)) for t in initial] for d in ("cpu", "cuda")}
    opts = {d: MaskedSGD(params[d], lr=0.05, momentum=0.9, weight_decay=1e-3) for d in params}
    for _ in range(6):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        rows = torch.rand(shapes[0][0], generator=gen) < 0.5
        for device in ("cpu", "cuda"):
            ps = params[device]
            before = ps[0].detach().clone()
            for p, g in zip(ps, grads):
                p.grad = g.clone().to(device)  # the step adds weight decay into .grad in place
            mask = rows.to(device, torch.float32).view(-1, 1, 1)
            opts[device].step({ps[0]: mask, ps[2]: False})
            # Rows the mask leaves out do not move at all.
            assert torch.equal(ps[0].detach()[~rows.to(device)], before[~rows.to(device)])
    for a, b in zip(params["cpu"], params["cuda"]):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-7)
        if "momentum_buffer" in opts["cpu"].state[a]:
            torch.testing.assert_close(opts["cuda"].state[b]["momentum_buffer"].cpu(),
                                       opts["cpu"].state[a]["momentum_buffer"], rtol=1e-6, atol=1e-7)
    assert torch.equal(params["cuda"][2].detach().cpu(), initial[2])  # the skipped parameter


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_drop_path_keep_rate_and_reproducibility():
    space = NAOSpace(op_set="small")
    model = Supernet(space, layers=1, channels=8, drop_path_keep_prob=0.6, total_steps=10, seed=7).cuda()
    model.set_step(9)  # full drop rate: keep = 1 - (cell+1)/cells * 0.4
    keep = torch.tensor(model.keep_probs())
    masks = model.drop_path_masks(20000, torch.device("cuda"))
    assert masks.is_cuda and masks.shape == (model.num_cells, 20000, 2 * model.num_nodes)
    kept = (masks > 0).float().mean((1, 2)).cpu()
    n = 20000 * 2 * model.num_nodes
    assert ((kept - keep).abs() <= 5 * (keep * (1 - keep) / n).sqrt()).all(), (kept, keep)
    values = masks.unique().cpu()
    expected = torch.cat([torch.zeros(1), (1 / keep).float()]).unique()
    assert values.shape == expected.shape and torch.allclose(values, expected, rtol=1e-5)
    # Same seed -> same masks; another seed -> others; a restored state continues the stream.
    twin = Supernet(space, layers=1, channels=8, drop_path_keep_prob=0.6, total_steps=10, seed=7).cuda()
    twin.set_step(9)
    assert torch.equal(twin.drop_path_masks(20000, torch.device("cuda")), masks)
    state = model.rng_state()
    nxt = model.drop_path_masks(64, torch.device("cuda"))
    model.set_rng_state(state)
    assert torch.equal(model.drop_path_masks(64, torch.device("cuda")), nxt)
    other = Supernet(space, layers=1, channels=8, drop_path_keep_prob=0.6, total_steps=10, seed=8).cuda()
    other.set_step(9)
    assert not torch.equal(other.drop_path_masks(20000, torch.device("cuda")), masks)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_tensor_loader_cuda_same_batches_as_cpu_and_exact_resume():
    ds = create_dataset("synthetic", num_samples=300, image_shape=(32, 32, 3))
    kw = dict(augment=AugmentConfig(cutout=16), seed=11, drop_last=False)
    cpu = list(create_loader("tensor", ds, 64, device="cpu", **kw))
    loader = create_loader("tensor", ds, 64, device="cuda", **kw)
    cuda = list(loader)
    assert len(cuda) == len(cpu) == 5
    for (xc, yc), (xg, yg) in zip(cpu, cuda):
        assert xg.is_cuda and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)  # fused multiply-add: 1 ulp at most
    nxt = list(loader)  # epoch 1
    resumed = create_loader("tensor", ds, 64, device="cuda", **kw)
    resumed.load_state_dict({**loader.state_dict(), "epoch": 1, "position": 2})
    for (xa, ya), (xb, yb) in zip(nxt[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _grid_draws() -> int:
    """More draws than one full grid of the CUDA draw kernel (16 blocks per SM x 256 threads x 4 draws)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return max(2_300_000, sms * 16 * 256 * 4 + 1001)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_sampler_cuda_draws_equal_cpu_past_a_grid_and_a_refill():
    from bnao import extension

    assert extension.has_kernel("alias_draw", "cuda"), "bnao._C was built without its CUDA kernels"
    sizes = np.random.default_rng(0).integers(100_000, 5_000_001, 1_000_000).astype(np.float64)
    cpu = create_sampler("proportional", sizes, seed=5, device="cpu")
    cuda = create_sampler("proportional", sizes, seed=5, device="cuda")
    n = _grid_draws()
    many = cuda.draw(n)
    assert many.is_cuda and torch.equal(many.cpu(), cpu.draw(n))
    # Single draws: the CUDA buffer (65,536) refills once here, the CPU one (8,192) several times.
    singles = 70_000
    assert [cuda.draw() for _ in range(singles)] == [cpu.draw() for _ in range(singles)]
    assert cuda.num_drawn == cpu.num_drawn == n + singles
    assert torch.equal(cuda.draw(1000).cpu(), cpu.draw(1000))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("source,target", [("cuda", "cpu"), ("cpu", "cuda")])
def test_supernet_checkpoint_moves_between_cpu_and_gpu(tmp_path, source, target):
    trainer, _, _ = train_supernet(source, steps=3, keep_prob=0.9)
    path = tmp_path / "ckpt.pt"
    trainer.save_checkpoint(path)
    moved, _ = build_trainer(target, keep_prob=0.9)
    moved.load_checkpoint(path)
    assert moved.global_step == trainer.global_step and moved.sampler.num_drawn == trainer.sampler.num_drawn
    assert np.array_equal(moved.draw_counts(), trainer.draw_counts())
    for (name, a), b in zip(trainer.model.named_parameters(), moved.model.parameters()):
        assert b.device.type == target and torch.equal(a.detach().cpu(), b.detach().cpu()), name
    # Every saved mask-generator state travels on (restored here, where both devices exist).
    assert set(trainer.model.rng_state()) <= set(moved.model.rng_state())
    moved.train_steps(2)
    trainer.train_steps(2)
    assert moved.global_step == trainer.global_step
    assert np.array_equal(moved.draw_counts(), trainer.draw_counts())  # the draw sequence is the same

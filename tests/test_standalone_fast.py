"""The stand-alone net's CPU fast paths (same arithmetic as the plain ops) and the demo's recipe options.

Fast paths are compared in float64 against an independent formulation: ``nn.AvgPool2d`` for the
average pool, the reference's padded-and-shifted factorized reduce for the second path. Recipe options
(``lr_schedule``, ``augment``) against a hand count of the cosine and the loader's settings.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnao.nets.layers import AvgPool, FactorizedReduce, make_op
from bnao.space import NAOSpace
from bnao.space.ops import KIND_AVG_POOL
from bnao.train import StandaloneTrainer, make_config, train_standalone

pytestmark = pytest.mark.usefixtures("one_thread")

CL = torch.channels_last


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 28), (3, 2, 28), (3, 1, 7), (3, 2, 7), (5, 1, 8), (5, 2, 9)])
def test_avg_pool_fast_path_is_the_pooling(kernel, stride, size):
    torch.manual_seed(0)
    x = torch.randn(4, 6, size, size, dtype=torch.float64)
    ref_pool = nn.AvgPool2d(kernel, stride=stride, padding=kernel // 2, count_include_pad=False)
    x64 = x.clone().requires_grad_()
    y64 = ref_pool(x64)
    g = torch.randn_like(y64)
    (gx64,) = torch.autograd.grad(y64, x64, g)

    pool = make_op(KIND_AVG_POOL, kernel, 6, stride)
    assert isinstance(pool, AvgPool) and isinstance(pool, nn.AvgPool2d)
    assert pool.state_dict() == {} and not list(pool.parameters())
    x32 = x.float().contiguous(memory_format=CL).requires_grad_()
    assert pool._fast(x32)
    y32 = pool(x32)
    assert y32.shape == y64.shape and y32.is_contiguous(memory_format=CL)
    (gx32,) = torch.autograd.grad(y32, x32, g.float().contiguous(memory_format=CL))
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx32.double(), gx64, rtol=1e-5, atol=1e-6)
    # Other inputs take nn.AvgPool2d's own forward.
    assert not pool._fast(x) and torch.equal(pool(x), ref_pool(x))
    assert not pool._fast(x.float())  # NCHW


def _reference_factorized_reduce(fr: FactorizedReduce, x: torch.Tensor) -> torch.Tensor:
    """The reference's formulation: pad right/bottom, drop the first row and column, strided 1x1 conv."""
    if fr.relu:
        x = F.relu(x)
    shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
    first = F.conv2d(x, fr.conv1.weight, stride=2)
    return fr.bn(torch.cat([first, F.conv2d(shifted, fr.conv2.weight, stride=2)], dim=1))


@pytest.mark.parametrize("size", [8, 7, 28])
@pytest.mark.parametrize("relu", [False, True])
def test_factorized_reduce_matches_the_padded_formulation(size, relu):
    torch.manual_seed(1)
    fr = FactorizedReduce(5, 7, relu=relu).double()
    x = torch.randn(3, 5, size, size, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fr(xa), _reference_factorized_reduce(fr, xb)
    assert ya.shape == yb.shape == (3, 7, (size + 1) // 2, (size + 1) // 2)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ya)
    params = list(fr.parameters())
    ga = torch.autograd.grad(ya, [xa, *params], g)
    gb = torch.autograd.grad(yb, [xb, *params], g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Channels-last float32 (the CPU training layout) too.
    fr32 = fr.float().to(memory_format=CL)
    y32 = fr32(x.float().contiguous(memory_format=CL))
    torch.testing.assert_close(y32.double(), yb.detach(), rtol=1e-4, atol=1e-4)


def test_lr_at_step_is_the_cosine_by_hand():
    cfg = make_config(epochs=3, lr_max=0.1, lr_min=0.01, lr_schedule="step")
    total = 12
    for step in range(total):
        t = step / (total - 1)
        assert cfg.lr_at_step(step, total) == pytest.approx(0.01 + 0.045 * (1 + math.cos(math.pi * t)))
    assert cfg.lr_at_step(0, total) == pytest.approx(0.1) and cfg.lr_at_step(total - 1, total) == pytest.approx(0.01)
    per_epoch = dataclasses.replace(cfg, lr_schedule="epoch")
    assert [per_epoch.lr_at_step(s, total) for s in range(total)] == [per_epoch.lr_at(s // 4) for s in range(total)]
    with pytest.raises(ValueError, match="lr_schedule"):
        make_config(lr_schedule="linear").validate()


def _task():
    from test_train import brightness_task

    return brightness_task(96, 0), brightness_task(32, 1)


def test_per_step_schedule_sets_every_step_and_default_is_per_epoch(monkeypatch):
    train, test = _task()
    space = NAOSpace()
    arch = space.sample(3)
    seen = []
    real_step = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    tiny = dict(layers=1, channels=4, batch_size=32, eval_batch_size=64, epochs=2, lr_max=0.05, seed=0)
    res = train_standalone(arch, space, train, test, device="cpu", lr_schedule="step", **tiny)
    total = 2 * (96 // 32)
    assert seen == pytest.approx([0.025 * (1 + math.cos(math.pi * s / (total - 1))) for s in range(total)])
    assert [h["lr"] for h in res["history"]] == pytest.approx([seen[0], seen[3]])
    seen.clear()
    train_standalone(arch, space, train, test, device="cpu", **tiny)
    assert seen == pytest.approx([0.05] * 3 + [0.025] * 3)  # today's per-epoch cosine


def test_augment_off_and_old_checkpoints_resume(tmp_path):
    train, _ = _task()
    space = NAOSpace()
    arch = space.sample(3)
    tiny = dict(layers=1, channels=4, batch_size=32, epochs=2, seed=0)
    on = StandaloneTrainer(arch, space, train, None, make_config(**tiny), device="cpu")
    off = StandaloneTrainer(arch, space, train, None, make_config(augment=False, **tiny), device="cpu")
    assert on.train_loader.augment.random and not off.train_loader.augment.random
    # A checkpoint written before lr_schedule/augment existed holds neither key: the defaults apply.
    ckpt = tmp_path / "c.pt"
    first = StandaloneTrainer(arch, space, train, None, make_config(**tiny), device="cpu", checkpoint_path=ckpt)
    first.model.train()
    first.epoch = 1
    state = first.state_dict()
    for key in ("lr_schedule", "augment"):
        del state["config"][key]
    torch.save(state, ckpt)
    again = StandaloneTrainer(arch, space, train, None, make_config(**tiny), device="cpu", checkpoint_path=ckpt)
    again.load_checkpoint()
    assert again.epoch == 1
    other = StandaloneTrainer(arch, space, train, None, make_config(lr_schedule="step", **tiny), device="cpu",
                              checkpoint_path=ckpt)
    from bnao.train import CheckpointError

    with pytest.raises(CheckpointError, match="lr_schedule"):
        other.load_checkpoint()


def test_search_config_final_keys_reach_the_trainer():
    from bnao.search.config import ConfigError, load_config
    from bnao.search.final import standalone_settings

    base = standalone_settings(load_config(), 10, 1)
    assert base["lr_schedule"] == "epoch" and base["augment"] is True
    cfg = load_config(overrides=["final.lr_schedule=step", "final.augment=false"])
    s = standalone_settings(cfg, 10, 1)
    assert s["lr_schedule"] == "step" and s["augment"] is False
    make_config(**s).validate()
    with pytest.raises(ConfigError):
        load_config(overrides=["final.lr_schedule=linear"])

"""Supernet trainer: masked SGD semantics, exact resume, NaN path, atomic and corrupt checkpoints."""

import numpy as np
import pytest
import torch

from bnao.data import create_dataset, create_loader
from bnao.sampling import create_sampler
from bnao.space import NAOSpace
from bnao.supernet import (
    CheckpointError,
    NonFiniteLossError,
    Supernet,
    SupernetTrainer,
    cosine_lr,
)

SPACE = NAOSpace()


def _make(seed_model=0, pool_size=6, loader=None, **kw):
    torch.manual_seed(seed_model)
    model = Supernet(SPACE, layers=1, channels=4, num_classes=4, drop_path_keep_prob=0.8, dropout=0.2,
                     auxiliary=False)
    pool = SPACE.sample_array(pool_size, 3)
    sampler = create_sampler("proportional", np.arange(1, pool_size + 1, dtype=np.float64), seed=5)
    if loader is None:
        ds = create_dataset("synthetic", num_samples=40, image_shape=(8, 8, 3), num_classes=4)
        loader = create_loader("tensor", ds, 8, device="cpu", augment=True, shuffle=True, drop_last=True, seed=1)
    args = dict(steps_total=20, label_smoothing=0.1)
    args.update(kw)
    return SupernetTrainer(model, sampler, pool, loader, **args)


def test_masked_sgd_equals_sgd_on_per_slot_parameters(per_slot_sgd):
    stacked, rows, opt, ref = per_slot_sgd
    for used in ([0, 1], [1, 2, 3], [4], [0, 4], [2]):
        grad = torch.randn(5, 3)
        mask = torch.zeros(5, 1)
        mask[used] = 1
        stacked.grad = grad * mask  # untouched rows: zero gradient (what index_select's backward gives)
        opt.step({stacked: mask})
        for i, p in enumerate(rows):
            p.grad = grad[i].clone() if i in used else None  # NAO: an unused slot has no gradient
        ref.step()
        torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in rows]))
    # False skips a parameter entirely; no entry updates it fully.
    before = stacked.detach().clone()
    stacked.grad = torch.ones(5, 3)
    opt.step({stacked: False})
    assert torch.equal(stacked.detach(), before)
    opt.step()
    assert not torch.equal(stacked.detach(), before)


def test_cosine_schedule_and_restart():
    assert cosine_lr(0, 10, 0.025, 0.001) == pytest.approx(0.025)
    assert cosine_lr(10, 10, 0.025, 0.001) == pytest.approx(0.001)
    assert cosine_lr(5, 10, 0.025, 0.001) == pytest.approx(0.013)
    tr = _make()
    tr.train_steps(3)
    assert tr.current_lr() < 0.025
    tr.restart_schedule(7)
    assert tr.current_lr() == pytest.approx(0.025) and tr.schedule_steps == 7


def test_train_steps_reports_and_counts_draws():
    tr = _make()
    before = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
    stats = tr.train_steps(4)
    for key in ("loss", "acc", "lr", "img_per_s", "draw_ms", "forward_ms", "backward_ms", "optimizer_ms"):
        assert np.isfinite(stats[key]), key
    assert stats["bad_steps"] == 0 and tr.global_step == 4
    assert tr.draw_counts().sum() == 4 and tr.draw_counts().shape == (6,)
    changed = [k for k, v in tr.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert "classifier.weight" in changed
    # Slots no drawn arch used stay exactly where they were (no weight decay, no momentum).
    used = np.zeros(tr.model.slot_tensor(0, 0, "pw1").shape[0], dtype=bool)
    for i in np.flatnonzero(tr.draw_counts()):
        m = tr.model.touched_masks(tuple(int(v) for v in tr.pool[i]))[tr.model.slot_tensor(0, 0, "pw1")]
        used |= m.flatten().numpy() > 0
    pw = tr.model.slot_tensor(0, 0, "pw1").detach()
    assert torch.equal(pw[~torch.from_numpy(used)], before["slot_params.s0_sep_conv_3x3_pw1"][~torch.from_numpy(used)])
    assert not torch.equal(pw[torch.from_numpy(used)], before["slot_params.s0_sep_conv_3x3_pw1"][torch.from_numpy(used)])


def test_resume_gives_identical_weights(tmp_path):
    ref = _make()
    ref.train_steps(7)  # crosses an epoch boundary (5 batches per epoch)

    first = _make()
    first.train_steps(3)
    path = tmp_path / "sn.ckpt"
    first.save_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["sn.ckpt"]  # no temp file left behind

    resumed = _make(seed_model=123)  # different init: everything must come from the checkpoint
    resumed.load_checkpoint(path)
    resumed.train_steps(4)
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert np.array_equal(ref.draw_counts(), resumed.draw_counts())
    assert resumed.global_step == 7


def test_corrupt_and_truncated_checkpoint_errors(tmp_path):
    tr = _make()
    path = tmp_path / "sn.ckpt"
    tr.save_checkpoint(path)
    data = path.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        tr.load_checkpoint(tmp_path / "trunc.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        tr.load_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="no such file"):
        tr.load_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"format": "something-else"}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a bnao-supernet-checkpoint"):
        tr.load_checkpoint(tmp_path / "other.ckpt")


class PoisonLoader:
    """Fixed batches; the ones listed in ``poison`` (by global index) carry NaN images."""

    def __init__(self, poison, n=4):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 4, (n, 8), generator=g)
        self.poison = set(poison)
        self.count = 0

    def __iter__(self):
        for i in range(len(self.x)):
            x = self.x[i].clone()
            if self.count in self.poison:
                x[0, 0, 0, 0] = float("nan")
            self.count += 1
            yield x, self.y[i]


def test_nan_loss_step_is_skipped_and_counted(caplog):
    tr = _make(loader=PoisonLoader(poison={1}), max_bad_steps=2)
    tr.train_steps(1)
    before = {k: v.clone() for k, v in tr.model.named_parameters()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in tr.optimizer.state.items()}
    with caplog.at_level("WARNING"):
        stats = tr.train_steps(1)  # the poisoned batch
    assert stats["bad_steps"] == 1 and tr.bad_steps_total == 1
    assert "non-finite loss" in caplog.text
    for k, v in tr.model.named_parameters():
        assert torch.equal(v, before[k]), k
    for p, buf in momentum.items():
        assert torch.equal(tr.optimizer.state[p]["momentum_buffer"], buf)
    stats = tr.train_steps(2)  # good batches again: counter of consecutive bad steps resets
    assert stats["bad_steps"] == 0 and tr.bad_in_row == 0
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_consecutive_nan_losses_raise():
    tr = _make(loader=PoisonLoader(poison={2, 3, 4}), max_bad_steps=3)
    tr.train_steps(2)
    with pytest.raises(NonFiniteLossError, match="3 consecutive supernet steps had a NaN or infinite loss"):
        tr.train_steps(5)
    assert tr.bad_steps_total == 3


def _steps(num_steps, **kw):
    """Per-step losses, final weights, initial weights and what the model saw (autocast on, channels-last
    images) of a trainer on batches of 16 (the same model, pool, draws, batches and masks for every ``kw``)."""
    ds = create_dataset("synthetic", num_samples=64, image_shape=(8, 8, 3), num_classes=4)
    loader = create_loader("tensor", ds, 16, device="cpu", augment=True, shuffle=True, drop_last=True, seed=1)
    tr = _make(seed_model=1, loader=loader, **kw)
    seen = []
    tr.model.register_forward_pre_hook(lambda mod, args: seen.append(
        (torch.is_autocast_enabled("cpu"), args[0].is_contiguous(memory_format=torch.channels_last))))
    w0 = torch.cat([p.detach().flatten() for p in tr.model.parameters()]).clone()
    losses = []
    for _ in range(num_steps):
        stats = tr.train_steps(1)
        assert stats["bad_steps"] == 0
        losses.append(stats["loss"])
    w = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    return np.array(losses), w, w0, seen


def test_bf16_and_channels_last_steps_match_fp32():
    """Three steps with bf16 autocast and channels-last batches against the fp32, contiguous run.

    Tolerances: bf16 keeps 8 significant bits, and BN over 16 images at 2x2 (the last stage of this tiny
    net) amplifies the rounding, so the runs drift apart: measured on 4 model seeds (x86 CPU), per-step
    losses (about 2) differ by <= 0.036 and the weights end <= 0.47 of the fp32 update away from the fp32
    weights. Bounds: 0.1 and 0.75. A run with other drop-path / dropout masks (as a broken path would
    give) had a step off by 0.12-0.34 and ended 0.85-1.05 of the update away; a run that skips its
    updates ends 1.0 away. Channels-last alone changes no arithmetic on the CPU: fp32 within 1e-5.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: thread fork/join dominates (10x slower with 2 busy threads)
    try:
        ref, w_ref, w0, seen_ref = _steps(3)
        cl, w_cl, _, seen_cl = _steps(3, channels_last=True)
        both, w_both, _, seen_both = _steps(3, bf16=True, channels_last=True)
    finally:
        torch.set_num_threads(threads)
    assert seen_ref == [(False, False)] * 3 and seen_cl == [(False, True)] * 3
    np.testing.assert_allclose(cl, ref, rtol=1e-5)
    torch.testing.assert_close(w_cl, w_ref, rtol=1e-5, atol=1e-6)
    assert seen_both == [(True, True)] * 3  # the bf16 run really ran under autocast, on channels-last batches
    assert np.abs(both - ref).max() < 0.1, (both, ref)
    drift = ((w_both - w_ref).norm() / (w_ref - w0).norm()).item()
    assert drift < 0.75, f"bf16 weights {drift:.2f} of the fp32 update away from the fp32 weights"


def test_pool_validation():
    tr = _make()
    with pytest.raises(ValueError):
        tr.set_pool(np.zeros((3, 7), dtype=np.int64))
    tr.set_pool(SPACE.sample_array(3, 0))
    assert tr.draw_counts().shape == (3,)


def test_profile_command_runs_and_missing_dataset_is_an_error(capsys, tmp_path):
    from bnao.cli import main

    rc = main(["profile", "--layers", "1", "--channels", "4", "--batch-size", "4", "--steps", "1", "--warmup", "0",
               "--pool-size", "5", "--device", "cpu", "--eval-archs", "1", "--eval-batch", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "img/s" in out and "forward" in out and "ops launched per step" in out and "archs/s" in out
    assert "launch sequence of a training step over 5 archs: differs between archs" in out  # eager path
    rc = main(["profile", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "--dataset synthetic" in err

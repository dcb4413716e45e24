"""Supernet: grouped mixed_cell vs a naive per-branch reference, weight sharing, drop-path, BN modes."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnao.ops.schedule import cell_schedule
from bnao.space import NAOSpace
from bnao.space.ops import (
    KIND_AVG_POOL,
    KIND_DIL_SEP_CONV,
    KIND_IDENTITY,
    KIND_MAX_POOL,
    KIND_SEP_CONV,
    KIND_ZERO,
)
from bnao.supernet import Supernet, evaluate_pool


# ----------------------------------------------------------------------------- naive reference
def _bn(y, g, b):
    return F.batch_norm(y, None, None, g, b, True, 0.0, 1e-5)


def _fr(x, w, g, b):
    # The reference's FactorizedReduce has no ReLU; only the calibration after a reduction cell adds one.
    half = w.shape[0] // 2
    # NCHW for the strided 1x1 convolutions: torch's CPU kernel (2.11 and 2.14) gives a weight gradient read
    # from the wrong memory for a channels-last [4, 4, 8, 8] input at stride 2 (different on every call, and
    # once an abort), which made this reference, not the supernet, wrong. Back to channels last after.
    x = x.contiguous()
    shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
    y = torch.cat([F.conv2d(x, w[:half, :, None, None], stride=2),
                   F.conv2d(shifted, w[half:, :, None, None], stride=2)], 1)
    return _bn(y.contiguous(memory_format=torch.channels_last), g, b)


def naive_forward(m: Supernet, x, arch):
    """Per-branch, per-slot forward written independently of bnao.ops.cell (training-mode BN, no drop-path)."""
    B, table = m.num_nodes, m.table
    # Same memory format as the supernet on CPU, so max-pool ties break the same way.
    x = x.contiguous(memory_format=torch.channels_last)
    if m.skeleton == "cifar":
        s0 = s1 = _bn(F.conv2d(x, m.stem.weight, padding=1), m.stem.bn.weight, m.stem.bn.bias)
    else:
        h = F.relu(_bn(F.conv2d(x, m.stem0a.weight, stride=2, padding=1), m.stem0a.bn.weight, m.stem0a.bn.bias))
        s0 = _bn(F.conv2d(h, m.stem0b.weight, stride=2, padding=1), m.stem0b.bn.weight, m.stem0b.bn.bias)
        s1 = _bn(F.conv2d(F.relu(s0), m.stem1.weight, stride=2, padding=1), m.stem1.bn.weight, m.stem1.bn.bias)
    for ci, fx in zip(m.cell_info, m.fixed):
        if fx.pre0 == "fr":
            s0c = _fr(F.relu(s0), fx.pre0_w, fx.pre0_bn.weight, fx.pre0_bn.bias)
        elif fx.pre0 == "rcb":
            s0c = _bn(F.conv2d(F.relu(s0), fx.pre0_w[:, :, None, None]), fx.pre0_bn.weight, fx.pre0_bn.bias)
        else:
            s0c = s0
        s1c = s1
        if fx.pre1 == "rcb":
            s1c = _bn(F.conv2d(F.relu(s1), fx.pre1_w[:, :, None, None]), fx.pre1_bn.weight, fx.pre1_bn.bias)
        cell = arch[4 * B:] if ci.reduction else arch[:4 * B]
        states = [s0c, s1c]
        for node in range(B):
            total = 0
            for br in range(2):
                i, o = cell[4 * node + 2 * br], cell[4 * node + 2 * br + 1]
                kind, k = table[o]
                st = 2 if ci.reduction and i < 2 else 1
                h = states[i]
                if kind in (KIND_SEP_CONV, KIND_DIL_SEP_CONV):
                    slot = m.slot_index(ci.index, node, br, i, o)

                    def P(role):
                        return m.slot_tensor(ci.stage, o, role)[slot]

                    C = h.shape[1]
                    if kind == KIND_SEP_CONV:
                        h = F.conv2d(F.relu(h), P("dw1"), stride=st, padding=k // 2, groups=C)
                        h = _bn(F.conv2d(h, P("pw1")[:, :, None, None]), P("g1"), P("b1"))
                        h = F.conv2d(F.relu(h), P("dw2"), padding=k // 2, groups=C)
                        h = _bn(F.conv2d(h, P("pw2")[:, :, None, None]), P("g2"), P("b2"))
                    else:
                        h = F.conv2d(F.relu(h), P("dw"), stride=st, padding=2 * (k // 2), dilation=2, groups=C)
                        h = _bn(F.conv2d(h, P("pw")[:, :, None, None]), P("g"), P("b"))
                elif kind == KIND_IDENTITY and st == 2:
                    slot = m.slot_index(ci.index, node, br, i, o)
                    h = _fr(h, *(m.slot_tensor(ci.stage, o, r)[slot] for r in ("w", "g", "b")))
                elif kind == KIND_AVG_POOL:
                    h = F.avg_pool2d(h, 3, st, 1, count_include_pad=False)
                elif kind == KIND_MAX_POOL:
                    h = F.max_pool2d(h, 3, st, 1)
                elif kind == KIND_ZERO:
                    h = h[:, :, ::st, ::st] * 0.0
                total = total + h
            states.append(total)
        used = set(cell[0::4]) | set(cell[2::4])
        loose = [i for i in range(B + 2) if i not in used]
        outs = []
        for i in loose:
            s = states[i]
            if ci.reduction and i < 2:
                bn = fx.red0_bn if i == 0 else fx.red1_bn
                s = _fr(s, fx.red0_w if i == 0 else fx.red1_w, bn.weight, bn.bias)
            outs.append(s)
        w = torch.cat([fx.comb_w[:, i, :] for i in loose], 1)[:, :, None, None]
        out = _bn(F.conv2d(F.relu(torch.cat(outs, 1)), w), fx.comb_bn.weight, fx.comb_bn.bias)
        s0, s1 = s1, out
    return m.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


def _arch_all_op(space: NAOSpace, op: int, rng) -> tuple:
    """An arch whose every branch uses ``op``, with random input ids (so inputs 0/1 and nodes both occur)."""
    a = space.sample_array(1, rng)[0]
    a[1::2] = op
    a[0::4][[0, 5]] = 0  # node 2 of each cell reads input 0 and 1: stride-2 branches in the reduction cell
    a[2::4][[0, 5]] = 1
    return tuple(int(v) for v in a)


def _small(space, **kw):
    torch.manual_seed(0)
    args = dict(layers=1, channels=4, num_classes=5, drop_path_keep_prob=None)
    args.update(kw)
    return Supernet(space, **args)


# Gradients are compared for one op of every kind (sep, dil_sep, avg, max, identity, zero) to keep the
# test short on a 2-core CPU; forwards are compared for every op.
GRAD_OPS = {"small": ("sep_conv_3x3", "sep_conv_5x5", "avg_pool_3x3", "max_pool_3x3", "identity"),
            "middle": ("zero", "identity", "sep_conv_7x7", "dil_sep_conv_5x5")}


@pytest.mark.parametrize("op_set", ["small", "middle"])
def test_every_op_matches_naive_reference(op_set):
    space = NAOSpace(op_set=op_set)
    m = _small(space)
    rng = np.random.default_rng(0)
    x = torch.randn(4, 3, 8, 8)
    params = list(m.parameters())
    for op in range(space.num_ops):
        arch = _arch_all_op(space, op, rng)
        out = m(x, arch)
        ref = naive_forward(m, x, arch)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=f"op {space.op_names[op]}")
        if space.op_names[op] not in GRAD_OPS[op_set]:
            continue
        g = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
        g_ref = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
        for p, a, b in zip(params, g, g_ref):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            # Sums are reordered by the grouping: compare relative to the gradient's scale.
            scale = max(b.abs().max().item(), 1.0)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=f"grad, op {space.op_names[op]}")
    # Mixed random archs exercise the level grouping with several ops per level.
    for seed in range(3):
        arch = tuple(int(v) for v in space.sample_array(1, seed + 10)[0])
        torch.testing.assert_close(m(x, arch), naive_forward(m, x, arch), rtol=1e-4, atol=1e-5)


def test_imagenet_skeleton_and_aux_head():
    space = NAOSpace()
    m = _small(space, skeleton="imagenet", channels=4, auxiliary=True)
    x = torch.randn(2, 3, 48, 48)
    arch = tuple(int(v) for v in space.sample_array(1, 3)[0])
    logits, aux = m(x, arch)
    assert logits.shape == (2, 5) and aux.shape == (2, 5)
    (logits.sum() + aux.sum()).backward()
    m.eval()
    torch.testing.assert_close(m(x, arch, bn_train=True), naive_forward(m, x, arch), rtol=1e-4, atol=1e-5)
    assert m(x, arch).shape == (2, 5)  # running statistics path


def test_weight_sharing_same_storage_and_untouched_slots_zero():
    space = NAOSpace()
    m = _small(space)
    x = torch.randn(4, 3, 8, 8)
    base = np.array(space.sample_array(1, 7)[0])
    base[0:2] = (0, 0)  # normal cell, node 2, branch x: input 0, sep_conv_3x3
    other = np.array(space.sample_array(1, 8)[0])
    other[0:2] = (0, 0)
    moved = other.copy()
    moved[0] = 1  # same op and position, other input id -> another slot
    slot = m.slot_index(0, 0, 0, 0, 0)
    assert slot != m.slot_index(0, 0, 0, 1, 0)
    pw = m.slot_tensor(0, 0, "pw1")

    def touched_rows(arch):
        m.zero_grad(set_to_none=True)
        m(x, tuple(int(v) for v in arch)).square().sum().backward()
        return set(torch.nonzero(pw.grad.flatten(1).abs().sum(1)).flatten().tolist())

    rows_a, rows_b, rows_c = touched_rows(base), touched_rows(other), touched_rows(moved)
    assert slot in rows_a and slot in rows_b and slot not in rows_c
    assert m.slot_index(0, 0, 0, 1, 0) in rows_c
    # Rows untouched by an arch have exactly zero gradient; the touched set is what touched_masks reports.
    mask = m.touched_masks(tuple(int(v) for v in moved))[pw].flatten()
    assert set(torch.nonzero(mask).flatten().tolist()) == rows_c
    assert pw.grad[mask == 0].abs().max() == 0
    # Changing the shared row changes both archs' outputs; the third arch does not read it.
    m.train()
    with torch.no_grad():
        before = [m(x, tuple(int(v) for v in a)) for a in (base, other, moved)]
        pw[slot].mul_(3.0)
        after = [m(x, tuple(int(v) for v in a)) for a in (base, other, moved)]
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])
    torch.testing.assert_close(before[2], after[2])


def test_few_parameter_tensors():
    m = Supernet(NAOSpace(), layers=3, channels=8)
    # Stacked slots: a handful of tensors per stage, not one per (cell, node, branch, op, input id).
    assert len(list(m.parameters())) < 200
    assert len(m.slot_params) == 3 * 16 + 2 * 3


# Drop-path keep probabilities worked out by hand (SPEC section 4) for 5 cells (N=1), base keep 0.9 and
# 10 supernet steps per search iteration: cell c (0..4) at step s keeps 1 - (s+1)/10 * (c+1)/5 * (1 - 0.9).
HAND_KEEP_0_9_OF_10 = {
    0: [0.998, 0.996, 0.994, 0.992, 0.990],  # progress 1/10
    4: [0.990, 0.980, 0.970, 0.960, 0.950],  # progress 5/10
    9: [0.980, 0.960, 0.940, 0.920, 0.900],  # progress 1: the last cell reaches the base keep 0.9
}
# Base keep 0.6, 100 steps: 1 - (s+1)/100 * (c+1)/5 * 0.4.
HAND_KEEP_0_6_OF_100 = {
    0: [0.9992, 0.9984, 0.9976, 0.9968, 0.9960],
    49: [0.96, 0.92, 0.88, 0.84, 0.80],
    99: [0.92, 0.84, 0.76, 0.68, 0.60],
}


def test_keep_probs_hand_computed_and_ramp_restarts_every_iteration():
    m = _small(NAOSpace(), drop_path_keep_prob=0.9, total_steps=10)
    assert m.num_cells == 5
    for step, want in HAND_KEEP_0_9_OF_10.items():
        m.set_step(step)
        assert m.keep_probs() == pytest.approx(want, abs=1e-12), step
    # total_steps is one search iteration's steps and the step counts from 0 again in every iteration:
    # three iterations of 10 steps ramp up three times, from the same start to the same end.
    for iteration in range(3):
        for step in range(10):
            m.set_step(step)
            keeps = m.keep_probs()
            if step in HAND_KEEP_0_9_OF_10:
                assert keeps == pytest.approx(HAND_KEEP_0_9_OF_10[step], abs=1e-12), (iteration, step)
            assert keeps[-1] == pytest.approx(1.0 - (step + 1) / 10 * 0.1, abs=1e-12), (iteration, step)
    # Past the end of an iteration the progress stays at 1 (never below the base keep).
    m.set_step(25)
    assert m.keep_probs() == pytest.approx(HAND_KEEP_0_9_OF_10[9], abs=1e-12)
    # Without a step count the progress factor is 1; without drop-path every cell keeps everything.
    m = _small(NAOSpace(), drop_path_keep_prob=0.9, total_steps=None)
    m.set_step(3)
    assert m.keep_probs() == pytest.approx(HAND_KEEP_0_9_OF_10[9], abs=1e-12)
    assert _small(NAOSpace(), drop_path_keep_prob=None, total_steps=10).keep_probs() == [1.0] * 5


def test_drop_path_statistics_follow_schedule():
    space = NAOSpace()
    m = _small(space, drop_path_keep_prob=0.6, total_steps=100)
    for step, want in HAND_KEEP_0_6_OF_100.items():
        m.set_step(step)
        assert m.keep_probs() == pytest.approx(want, abs=1e-12), step
        masks = m.drop_path_masks(20000, torch.device("cpu"))
        for cell, keep in enumerate(want):
            # 20000 x 10 Bernoulli draws a cell: the kept fraction has a standard deviation below 0.0012.
            kept = masks[cell] > 0
            assert kept.float().mean().item() == pytest.approx(keep, abs=0.01), (step, cell)
            torch.testing.assert_close(masks[cell][kept], torch.full_like(masks[cell][kept], 1.0 / keep))
    # Training forward uses the masks (outputs vary); identical generator state gives identical outputs.
    x = torch.randn(4, 3, 8, 8)
    arch = _arch_all_op(space, 0, np.random.default_rng(1))
    state = m.rng_state()
    a = m(x, arch)
    b = m(x, arch)
    assert not torch.allclose(a, b)
    m.set_rng_state(state)
    torch.testing.assert_close(m(x, arch), a)


def test_drop_path_drops_identity_as_the_reference_unless_exempted():
    # The reference's search model drops every branch, identity included: an all-identity arch is random
    # in training mode at keep 0.5; with drop_path_identity=False it is deterministic, a sep-conv arch not.
    space = NAOSpace()
    x = torch.randn(4, 3, 8, 8)
    ident = _arch_all_op(space, space.op_names.index("identity"), np.random.default_rng(0))
    sep = _arch_all_op(space, 0, np.random.default_rng(0))
    m = _small(space, drop_path_keep_prob=0.5, total_steps=1)
    m.set_step(0)
    assert not torch.allclose(m(x, ident), m(x, ident))
    exempt = _small(space, drop_path_keep_prob=0.5, total_steps=1, drop_path_identity=False)
    exempt.set_step(0)
    torch.testing.assert_close(exempt(x, ident), exempt(x, ident))
    assert not torch.allclose(exempt(x, sep), exempt(x, sep))


def test_evaluator_uses_batch_stats_and_changes_nothing():
    space = NAOSpace()
    m = _small(space, dropout=0.3, drop_path_keep_prob=0.8, total_steps=10)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    pool = space.sample_array(4, 0)
    m.train()
    m(x, tuple(int(v) for v in pool[0]))  # move running stats away from their init
    state = copy.deepcopy(m.state_dict())
    rng = {k: v.clone() for k, v in m.rng_state().items()}
    acc, loss = evaluate_pool(m, pool, (x, y))
    assert acc.dtype == np.float64 and acc.shape == (4,) and loss.shape == (4,)
    assert m.training  # mode restored
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in m.rng_state().items():
        assert torch.equal(v, rng[k])
    # Scores equal the batch-statistics forward (BN in training mode), not the running-statistics one.
    m.eval()
    for i, row in enumerate(pool):
        arch = tuple(int(v) for v in row)
        logits = m(x, arch, bn_train=True)
        assert loss[i] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert acc[i] == pytest.approx((logits.argmax(1) == y).float().mean().item())
        torch.testing.assert_close(logits, naive_forward(m, x, arch), rtol=1e-4, atol=1e-5)
    logits_running = m(x, tuple(int(v) for v in pool[0]))
    assert not torch.allclose(logits_running, m(x, tuple(int(v) for v in pool[0]), bn_train=True))
    # Several batches: image-weighted mean.
    acc2, loss2 = evaluate_pool(m, pool, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert np.all((acc2 >= 0) & (acc2 <= 1)) and np.all(np.isfinite(loss2))


def test_running_stats_update_matches_batch_norm():
    space = NAOSpace()
    m = _small(space)
    x = torch.randn(4, 3, 8, 8)
    arch = _arch_all_op(space, 0, np.random.default_rng(2))
    before = m.s0_running_mean.clone()
    m.train()
    m(x, arch)
    changed = (m.s0_running_mean != before).any(1)
    assert changed.any()
    # One sep conv BN row by hand: the first BN of normal cell 0, node 2, branch x.
    sched = cell_schedule(arch[:20], False, m.table)
    pos, op, j = sched.bn_slots[0]
    row = pos * m._bn_per_branch + m._bn_offset[op] + j
    slot = m.slot_index(0, pos // 2, pos % 2, arch[2 * pos], op)
    assert changed[row]
    with torch.no_grad():
        h = F.conv2d(F.relu(m.fixed[0].calibrate(*(m.stem(x, True, False),) * 2, True, False)[arch[2 * pos]]),
                     m.slot_tensor(0, op, "dw1")[slot], padding=1, groups=4)
        h = F.conv2d(h, m.slot_tensor(0, op, "pw1")[slot][:, :, None, None])
    torch.testing.assert_close(m.s0_running_mean[row], 0.1 * h.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.s0_running_var[row], 0.9 + 0.1 * h.var((0, 2, 3), unbiased=True),
                               rtol=1e-4, atol=1e-6)


def test_bf16_autocast_matches_fp32():
    """bf16 autocast forward and backward against the fp32 run of the same weights, batch, arch and random
    drop-path / dropout masks, in training mode (batch-statistics BN) and in eval mode (running statistics).

    Tolerances: bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%) and the net has about 20
    conv/BN layers; measured on 8 seeds (x86 CPU): logits relative error <= 1.2% in eval mode and <= 5.6% in
    training mode (BN over 16 images at 2x2 amplifies rounding), loss off by <= 0.008, gradient cosine
    >= 0.995 in eval mode and >= 0.85 in training mode. Bounds are 2-3x those. A path that breaks the
    computation (other or no drop-path / dropout masks, a dropped branch) is off by ~100% in the logits and
    has gradient cosine ~0.1, as measured with other masks.
    """
    space = NAOSpace()
    m = _small(space, drop_path_keep_prob=0.8, total_steps=10, dropout=0.2)
    m.set_step(9)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
    arch = tuple(int(v) for v in space.sample_array(1, 12)[0])
    state = m.rng_state()

    def run(bf16, train):
        net = copy.deepcopy(m)
        net.train(train)
        net.set_rng_state(state)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x, arch)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        return out.float(), loss.item(), grads

    for train, logit_tol, loss_tol, min_cos in [(False, 0.04, None, 0.98), (True, 0.12, 0.03, 0.75)]:
        out32, loss32, grad32 = run(False, train)
        out16, loss16, grad16 = run(True, train)
        rel = ((out16 - out32).norm() / out32.norm()).item()
        assert rel < logit_tol, f"train={train}: bf16 logits {rel:.3f} off the fp32 ones (relative)"
        if loss_tol is not None:  # eval-mode logits are in the thousands (running stats at init): no loss check
            assert abs(loss16 - loss32) < loss_tol, (train, loss16, loss32)
        cos = F.cosine_similarity(grad16, grad32, dim=0).item()
        assert cos > min_cos, f"train={train}: bf16 gradient cosine {cos:.3f} with the fp32 gradient"


def test_invalid_arch_rejected():
    m = _small(NAOSpace())
    with pytest.raises(ValueError):
        m(torch.randn(2, 3, 8, 8), [5] * 40)

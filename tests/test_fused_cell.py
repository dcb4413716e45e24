"""The fused cell's gather, node-output and slot-statistics ops, and ``fused_cell`` against the eager cell.

Every op is checked against its pure-PyTorch reference (``bnao/ops/fused/reference.py``) and with float64
``gradcheck`` and ``torch.library.opcheck``; :func:`fused_cell` is checked against the independent eager
path (``bnao.ops.cell.mixed_cell`` with the supernet's own weight gather): outputs, the gradient of every
weight and input, the slot-BN batch statistics in the eager BN order, and the running statistics.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DEVICES

from bnao import extension
from bnao.ops.cell import CellBuffers, CellWeights, mixed_cell
from bnao.ops.schedule import ROLES, cell_schedule
from bnao.ops.fused import cell as fused
from bnao.ops.fused import cell_nodes, nodes
from bnao.ops.fused.code import FLAG_BN1, FLAG_BN2, FLAGS, cell_code
from bnao.ops.fused.reference import (
    gather_rows_reference,
    node_output_reference,
    update_slot_stats_reference,
)
from bnao.ops.fused.supernet_glue import supernet_cell_code, supernet_role_stacks, update_stage_slot_stats
from bnao.space.nao import NAOSpace
from bnao.space.ops import op_table
from bnao.supernet.model import Supernet

OPS = ("gather_rows", "node_output", "update_slot_stats")


def _require_kernels(device):
    """Skips unless the compiled core has these ops for ``device`` (else the wrappers run the references)."""
    if not all(extension.has_kernel(op, device) for op in OPS):
        pytest.skip(f"bnao._C has no fused-cell kernels for {device}")


def _stacks(dtype, device, requires_grad=False):
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3), (5, 3, 5, 5), (4, 3, 7, 7)]
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=requires_grad) for s in shapes]


def _indices(device):
    # Every stack used, a row of each stack's end, two zero rows; rows unique per stack.
    select = torch.tensor([0, 2, -1, 1, 0, 2, -1, 1], device=device)
    rows = torch.tensor([5, 0, 3, 4, 1, 3, 0, 0], device=device)
    return select, rows


# ------------------------------------------------------------------ gather_rows
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_rows_matches_reference(device, dtype):
    _require_kernels(device)
    stacks = _stacks(dtype, device)
    select, rows = _indices(device)
    out = nodes.gather_rows(stacks, select, rows, (3, 7, 7))
    assert out.shape == (8, 3, 7, 7)
    torch.testing.assert_close(out, gather_rows_reference(stacks, select, rows, (3, 7, 7)), rtol=0, atol=0)
    # Independent spot checks of the layout: top-left corner, zero padding, zero rows.
    torch.testing.assert_close(out[0, :, :3, :3], stacks[0][5], rtol=0, atol=0)
    assert out[0, :, 3:].abs().sum() == 0 and out[0, :, :, 3:].abs().sum() == 0
    torch.testing.assert_close(out[1], stacks[2][0], rtol=0, atol=0)
    assert out[2].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_gather_rows_backward_dense_with_exact_zeros(device):
    _require_kernels(device)
    stacks = _stacks(torch.float64, device, requires_grad=True)
    select, rows = _indices(device)
    weight = torch.randn(8, 3, 7, 7, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((nodes.gather_rows(stacks, select, rows, (3, 7, 7)) * weight).sum(), stacks)
    expected = torch.autograd.grad((gather_rows_reference(stacks, select, rows, (3, 7, 7)) * weight).sum(), stacks)
    for s, (grad, ref) in enumerate(zip(grads, expected)):
        torch.testing.assert_close(grad, ref, rtol=0, atol=0)
        used = set(rows[select == s].tolist())
        for row in range(grad.shape[0]):
            if row not in used:
                assert torch.equal(grad[row], torch.zeros_like(grad[row])), (s, row)
    torch.testing.assert_close(grads[0][5], weight[0, :, :3, :3], rtol=0, atol=0)


def test_gather_rows_gradcheck_and_opcheck():
    _require_kernels("cpu")
    # Small sizes: gradgradcheck perturbs every element of the stacks and of the output gradient.
    stacks = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(3, 2, 1, 1), (3, 2, 2, 3), (3, 2, 3, 3)]]
    select = torch.tensor([2, -1, 0, 1, 0])
    rows = torch.tensor([1, 0, 2, 0, 0])
    assert torch.autograd.gradcheck(lambda *s: nodes.gather_rows(s, select, rows, (2, 3, 3)), stacks)
    assert torch.autograd.gradgradcheck(lambda *s: nodes.gather_rows(s, select, rows, (2, 3, 3)), stacks)
    torch.library.opcheck(torch.ops.bnao.gather_rows.default, (stacks, select, rows, [2, 3, 3]))
    grad = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    sizes = [int(v) for t in stacks for v in t.shape]
    torch.library.opcheck(torch.ops.bnao.gather_rows_backward.default, (grad, select, rows, sizes))


def test_gather_rows_rejects_bad_arguments():
    _require_kernels("cpu")
    stacks = _stacks(torch.float32, "cpu")
    select, rows = _indices("cpu")
    with pytest.raises(RuntimeError, match="selected twice"):
        torch.ops.bnao.gather_rows(stacks, torch.tensor([0, 0]), torch.tensor([1, 1]), [3, 7, 7])
    with pytest.raises(RuntimeError, match="outside stack 1"):
        torch.ops.bnao.gather_rows(stacks, torch.tensor([1]), torch.tensor([5]), [3, 7, 7])
    with pytest.raises(RuntimeError, match="3 stacks"):
        torch.ops.bnao.gather_rows(stacks, torch.tensor([3]), torch.tensor([0]), [3, 7, 7])
    with pytest.raises(RuntimeError, match="zero-padded, never cropped"):
        torch.ops.bnao.gather_rows(stacks, select, rows, [3, 5, 5])
    with pytest.raises(RuntimeError, match="1-D int64"):
        torch.ops.bnao.gather_rows(stacks, select.int(), rows, [3, 7, 7])


# ------------------------------------------------------------------ node_output
def _node_codes():
    """Branch codes of nodes covering every combination that node_output distinguishes."""
    table = op_table("middle")  # zero, identity, sep3, sep5, sep7, dil3, dil5, dil7, avg, max
    archs = [(0, 2, 1, 5), (1, 0, 0, 1), (0, 0, 1, 0), (2, 3, 0, 9), (1, 1, 0, 4)]
    codes = [cell_code(a, False, table)[0] for a in archs]
    codes.append(cell_code((1, 1, 0, 4), False, table, drop_identity=False)[0])
    return codes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mask", [False, True])
# 4 x 64 x 64 = 16,384 terms per statistic: on CUDA the backward's sums run split over 4 chunks of blocks
# (csrc/cell/reduction_split.h), 3 x 5 x 5 in one block per output; the tolerance allows for the longer sums.
@pytest.mark.parametrize("n, side, tolerance", [(3, 5, 1e-12), (4, 64, 1e-10)])
def test_node_output_matches_reference(device, with_mask, n, side, tolerance):
    _require_kernels(device)
    torch.manual_seed(1)
    c = 4
    for code in _node_codes():
        code = code.to(device)
        pre = torch.randn(2, n, c, side, side, dtype=torch.float64, device=device, requires_grad=True)
        stats = [torch.randn(2, c, dtype=torch.float64, device=device) for _ in range(4)]
        stats[1] = stats[1].abs() + 0.5
        stats = [s.requires_grad_() for s in stats]
        mask = (torch.rand(n, 2, dtype=torch.float64, device=device) > 0.4).double() * 2.0 if with_mask else None
        out = nodes.node_output(pre, code, *stats, mask)
        ref = node_output_reference(pre, code, tuple(stats), mask)
        torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance)
        weight = torch.randn_like(out)
        grads = torch.autograd.grad((out * weight).sum(), [pre, *stats], allow_unused=True)
        expected = [None] * 5  # both branches zero: the reference's output depends on nothing
        if ref.requires_grad:
            expected = torch.autograd.grad((ref * weight).sum(), [pre, *stats], allow_unused=True)
        for grad, exp in zip(grads, expected):
            torch.testing.assert_close(grad, torch.zeros_like(grad) if exp is None else exp, rtol=tolerance,
                                       atol=tolerance)


def test_node_output_gradcheck_and_opcheck():
    _require_kernels("cpu")
    torch.manual_seed(2)
    code = _node_codes()[3]  # sep conv (BN2, drop) + max pool
    pre = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    stats = [torch.randn(2, 3, dtype=torch.float64) for _ in range(4)]
    stats[1] = stats[1].abs() + 0.5
    stats = [s.requires_grad_() for s in stats]
    mask = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: nodes.node_output(a[0], code, *a[1:], mask), (pre, *stats))
    torch.library.opcheck(torch.ops.bnao.node_output.default, (pre, code, *stats, mask))
    torch.library.opcheck(torch.ops.bnao.node_output.default, (pre, code, *stats, None))
    grad = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    # The backward op has no autograd of its own (no double backward): check it on plain tensors.
    plain = [t.detach() for t in (pre, *stats[:3])]
    torch.library.opcheck(torch.ops.bnao.node_output_backward.default, (grad, plain[0], code, *plain[1:], mask))


def test_node_output_rejects_bad_arguments():
    _require_kernels("cpu")
    code = _node_codes()[0]
    pre = torch.randn(2, 2, 3, 4, 4)
    stats = [torch.randn(2, 3) for _ in range(4)]
    with pytest.raises(RuntimeError, match=r"code must be the int32 \[2, 9\]"):
        torch.ops.bnao.node_output(pre, code.long(), *stats, None)
    with pytest.raises(RuntimeError, match=r"gamma must be \[2, C\]"):
        torch.ops.bnao.node_output(pre, code, stats[0], stats[1], torch.randn(2, 4), stats[3], None)
    with pytest.raises(RuntimeError, match=r"drop_mask must be \[N, 2\]"):
        torch.ops.bnao.node_output(pre, code, *stats, torch.ones(3, 2))


# ------------------------------------------------------------ update_slot_stats
def _expected_slot_update(rm, rv, rows, mean, invstd, momentum, eps, count):
    """Supernet._update_slot_stats written out per element in float64 (independent of both implementations)."""
    rm, rv = rm.double().clone(), rv.double().clone()
    for k, row in enumerate(rows.tolist()):
        if row < 0:
            continue
        var = (1.0 / invstd[k].double() ** 2 - eps) * count / max(count - 1, 1)
        rm[row] = rm[row] + momentum * (mean[k].double() - rm[row])
        rv[row] = rv[row] + momentum * (var - rv[row])
    return rm, rv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_update_slot_stats(device, impl):
    if impl == "op":
        _require_kernels(device)
    torch.manual_seed(3)
    rm = torch.randn(10, 4, device=device)
    rv = torch.rand(10, 4, device=device) + 0.5
    rows = torch.tensor([7, -1, 0, 3, -1, 9], device=device)
    mean = torch.randn(6, 4, dtype=torch.float64, device=device)
    invstd = torch.rand(6, 4, dtype=torch.float64, device=device) + 0.5
    expected = _expected_slot_update(rm.cpu(), rv.cpu(), rows.cpu(), mean.cpu(), invstd.cpu(), 0.1, 1e-5, 50)
    untouched = rm.clone(), rv.clone()
    fn = torch.ops.bnao.update_slot_stats if impl == "op" else update_slot_stats_reference
    fn(rm, rv, rows, mean, invstd, 0.1, 1e-5, 50)
    torch.testing.assert_close(rm.double().cpu(), expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double().cpu(), expected[1], rtol=1e-6, atol=1e-6)
    for row in (1, 2, 4, 5, 6, 8):  # rows no statistic names stay bit-identical
        assert torch.equal(rm[row], untouched[0][row]) and torch.equal(rv[row], untouched[1][row])


def test_update_slot_stats_opcheck_and_errors():
    _require_kernels("cpu")
    rm, rv = torch.randn(5, 3), torch.rand(5, 3) + 0.5
    rows = torch.tensor([4, -1, 1])
    mean, invstd = torch.randn(3, 3), torch.rand(3, 3) + 0.5
    torch.library.opcheck(torch.ops.bnao.update_slot_stats.default, (rm, rv, rows, mean, invstd, 0.1, 1e-5, 8))
    with pytest.raises(RuntimeError, match="appears twice"):
        torch.ops.bnao.update_slot_stats(rm, rv, torch.tensor([1, 1, -1]), mean, invstd, 0.1, 1e-5, 8)
    with pytest.raises(RuntimeError, match="outside the 5"):
        torch.ops.bnao.update_slot_stats(rm, rv, torch.tensor([5, 0, -1]), mean, invstd, 0.1, 1e-5, 8)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.bnao.update_slot_stats(rm.t(), rv.t(), torch.tensor([0, 1, 2]), mean, invstd, 0.1, 1e-5, 8)


# ------------------------------------------------------------------ gather indices
def test_gather_indices_static_table():
    table = op_table("middle")  # zero, identity, sep3, sep5, sep7, dil3, dil5, dil7, avg, max
    index = fused.stack_index_table(table, [1, 2, 3, 4, 5, 6, 7])
    roles = fused.FUSED_ROLES
    # Stacks in op order: sep convs feed all 8 roles, dil sep convs dw1/pw1/g1/b1, identity pw1/g1/b1.
    assert index[roles.index("dw1")].tolist() == [-1, -1, 0, 1, 2, 3, 4, 5, -1, -1]
    assert index[roles.index("pw1")].tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, -1, -1]
    assert index[roles.index("g2")].tolist() == [-1, -1, 0, 1, 2, -1, -1, -1, -1, -1]
    # Reduction cell: identity reading input 1 (stride 2) has weights, identity reading node 2 and the
    # pool none; the dil sep conv 5x5 (op 6) is pw1's stack 5.
    code = cell_code((1, 1, 0, 8, 2, 1, 1, 6), True, table, slot_row=lambda n, b, i, o: 10 * n + b)
    select, rows = fused.gather_indices(code, index)
    assert select[roles.index("pw1")].tolist() == [0, -1, -1, 5]
    assert rows[roles.index("pw1")].tolist() == [0, 0, 0, 11]
    assert select[roles.index("dw1")].tolist() == [-1, -1, -1, 4]
    assert select[roles.index("dw2")].tolist() == [-1, -1, -1, -1]


# ------------------------------------------------------------------ fused_cell == mixed_cell
def _eager_weights(net, cell, cell_arch):
    """The weights Supernet.forward hands mixed_cell for one cell (its own gather, independent of the codes)."""
    info = net.cell_info[cell]
    sched = cell_schedule(tuple(cell_arch), info.reduction, net.table)
    ops = [()] * len(net.table)
    device = net.fixed[cell].comb_w.device
    for op, sizes in sched.op_chunks.items():
        index = torch.tensor([net.slot_index(cell, p // 2, p % 2, inp, op) for p, inp in sched.op_slots[op]],
                             device=device)
        roles = [net.slot_tensor(info.stage, op, role).index_select(0, index).split(list(sizes))
                 for role in ROLES[net.table[op][0]]]
        ops[op] = tuple(zip(*roles))
    fixed = net.fixed[cell]
    reduce_weights, reduce_stats = fixed.reduce_weights()
    weights = CellWeights(tuple(ops), reduce_weights, (fixed.comb_w, fixed.comb_bn.weight, fixed.comb_bn.bias),
                          torch.tensor(sched.loose, device=device))
    return sched, weights, CellBuffers(None, reduce_stats, (fixed.comb_bn.running_mean, fixed.comb_bn.running_var))


def _run_eager(net, arch, stage, inputs, masks):
    length = net.space.cell_length
    outs, stats = [], []
    for info, (x0, x1), mask in zip(net.stage_cells[stage], inputs, masks):
        cell_arch = tuple(arch[length:] if info.reduction else arch[:length])
        sched, weights, buffers = _eager_weights(net, info.index, cell_arch)
        out, mean, invstd = mixed_cell(x0, x1, cell_arch, weights, buffers, table=net.table,
                                       reduction=info.reduction, batch_stats=True, update_stats=True,
                                       drop_mask=mask, drop_identity=net.drop_path_identity)
        outs.append(out)
        stats.append((sched, mean, invstd))
    return outs, stats


def _run_fused(net, arch, stage, inputs, masks):
    length = net.space.cell_length
    cells = net.stage_cells[stage]
    device = inputs[0][0].device
    codes = torch.stack([supernet_cell_code(net, info.index, arch[length:] if info.reduction else arch[:length])
                         for info in cells]).to(device)  # the kernels read the codes on the activations' device
    select, rows = fused.gather_indices(codes, fused.stack_index_table(net.table, net.slot_ops[stage], device))
    gathered = fused.gather_node_weights(supernet_role_stacks(net, stage), select, rows,
                                         net.stage_channels[stage], codes.shape[:3], inputs[0][0])
    outs, means, invstds = [], [], []
    for i, (info, (x0, x1), mask) in enumerate(zip(cells, inputs, masks)):
        fixed = net.fixed[info.index]
        reduce_weights, reduce_stats = fixed.reduce_weights()
        out, mean, invstd = fused.fused_cell(
            x0, x1, codes[i], fused.NodeWeights(*(t[i] for t in gathered)), reduce_weights,
            (fixed.comb_w, fixed.comb_bn.weight, fixed.comb_bn.bias),
            CellBuffers(None, reduce_stats, (fixed.comb_bn.running_mean, fixed.comb_bn.running_var)),
            fused.loose_mask(codes[i], x0.dtype), reduction=info.reduction, drop_mask=mask)
        outs.append(out)
        means.append(mean)
        invstds.append(invstd)
    return outs, codes, torch.stack(means), torch.stack(invstds)


# Reduction cell of the middle set with input 0 loose (its reduction's running statistics must update),
# covering zero, identity with stride 2 and 1, every sep / dil sep conv size and both pools.
_HANDMADE_REDUCE = (1, 1, 1, 2, 2, 0, 1, 6, 3, 8, 2, 9, 4, 4, 1, 5, 5, 1, 3, 3)


def _stage_inputs(net, stage, drop, device):
    """Random cell inputs and drop masks for every cell of a stage (cells are not chained)."""
    batch, size = 2, 4 if stage == 0 else 3  # stage 1: the reduction cell reads 5x5 (odd: padded odd pixels)
    inputs, masks = [], []
    for info in net.stage_cells[stage]:
        side = 5 if info.reduction else size
        inputs.append([torch.randn(batch, info.channels, side, side, dtype=torch.float64, device=device)
                       for _ in range(2)])
        keep = (torch.rand(batch, 2 * net.num_nodes, dtype=torch.float64, device=device) < 0.7).double() / 0.7
        masks.append(keep if drop else None)
    return inputs, masks


def _assert_same_grads(eager_net, fused_net, eager_in, fused_in):
    for e_pair, f_pair in zip(eager_in, fused_in):
        for e, f in zip(e_pair, f_pair):
            # An input read only by zero ops gets no eager gradient; the fused cell's is exactly zero.
            expected = e.grad if e.grad is not None else torch.zeros_like(e)
            torch.testing.assert_close(f.grad, expected, rtol=1e-9, atol=1e-9)
    fused_params = dict(fused_net.named_parameters())
    nonzero = 0
    for name, p in eager_net.named_parameters():
        q = fused_params[name]
        e = p.grad if p.grad is not None else torch.zeros_like(p)
        f = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(f, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
        nonzero += int(p.grad is not None and bool(p.grad.abs().sum() > 0))
    assert nonzero > 0


def _assert_same_slot_stats(plan, stage, eager_stats, codes, mean, invstd):
    """The fused [cell, node, round, branch] statistics in the eager BN order, with the plan's rows."""
    fused_rows = fused.slot_bn_rows(codes)
    channels = mean.shape[-1]
    mapped_rows = []
    for i, (sched, e_mean, e_invstd) in enumerate(eager_stats):
        if e_mean is None:
            continue
        for k, (pos, _op, j) in enumerate(sched.bn_slots):
            node, branch = divmod(pos, 2)
            torch.testing.assert_close(mean[i, node, j, branch], e_mean.view(-1, channels)[k], rtol=1e-10,
                                       atol=1e-10)
            torch.testing.assert_close(invstd[i, node, j, branch], e_invstd.view(-1, channels)[k], rtol=1e-9,
                                       atol=1e-9)
            mapped_rows.append(int(fused_rows[i, node, j, branch]))
    assert mapped_rows == plan.bn_rows[stage].tolist()
    assert int((fused_rows >= 0).sum()) == len(mapped_rows)  # no extra BN rows in the fused layout


def _assert_same_running_stats(eager_net, fused_net, plan, stage, eager_stats, codes, mean, invstd, out):
    """``Supernet._update_slot_stats`` on the eager statistics vs one ``update_slot_stats`` call; all buffers."""
    batch, plane = out.shape[0], out.shape[-2] * out.shape[-1]
    stats = [[] for _ in range(eager_net.num_stages)]
    stats[stage] = [(m, v) for _s, m, v in eager_stats if m is not None]
    hw = [1] * eager_net.num_stages
    hw[stage] = plane
    for model in (eager_net, fused_net):  # the eager update folds float32 statistics into float32 buffers
        for name in (f"s{stage}_running_mean", f"s{stage}_running_var"):
            setattr(model, name, getattr(model, name).float())
    eager_net._update_slot_stats(SimpleNamespace(bn_rows=plan.bn_rows), stats, hw, batch)
    update_stage_slot_stats(getattr(fused_net, f"s{stage}_running_mean"),
                            getattr(fused_net, f"s{stage}_running_var"), codes, mean, invstd,
                            fused_net.bn_momentum, fused_net.bn_eps, batch * plane)
    fused_buffers = dict(fused_net.named_buffers())
    for name, buf in eager_net.named_buffers():
        torch.testing.assert_close(fused_buffers[name], buf, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _check_fused_equals_eager(op_set, stage, drop, seed, device="cpu", reduce_arch=None):
    """Runs every cell of ``stage`` eagerly and fused on copies of one supernet and compares everything."""
    torch.manual_seed(seed)
    net = Supernet(NAOSpace(op_set=op_set), layers=1, channels=4).double().to(device)
    arch = net.space.sample(seed).to_list()
    if reduce_arch is not None:
        arch = arch[: net.space.cell_length] + list(reduce_arch)
    eager_net, fused_net = copy.deepcopy(net), copy.deepcopy(net)
    inputs, masks = _stage_inputs(net, stage, drop, device)
    eager_in = [[x.clone().requires_grad_() for x in pair] for pair in inputs]
    fused_in = [[x.clone().requires_grad_() for x in pair] for pair in inputs]
    eager_out, eager_stats = _run_eager(eager_net, arch, stage, eager_in, masks)
    fused_out, codes, mean, invstd = _run_fused(fused_net, arch, stage, fused_in, masks)
    for e, f in zip(eager_out, fused_out):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-10)
    weights = [torch.randn_like(out) for out in eager_out]
    for outs in (eager_out, fused_out):
        sum((out * w).sum() for out, w in zip(outs, weights)).backward()
    _assert_same_grads(eager_net, fused_net, eager_in, fused_in)
    plan = eager_net._plan(tuple(arch), torch.device(device))
    _assert_same_slot_stats(plan, stage, eager_stats, codes, mean, invstd)
    _assert_same_running_stats(eager_net, fused_net, plan, stage, eager_stats, codes, mean, invstd, fused_out[0])
    return net, arch


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("op_set", ["small", "middle"])
def test_fused_cell_equals_eager(op_set, stage, drop):
    _check_fused_equals_eager(op_set, stage, drop, seed=11 + 2 * stage + int(drop))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_cell_equals_eager_loose_reduced_input(device):
    if device == "cuda":
        _require_kernels("cuda")
    net, arch = _check_fused_equals_eager("middle", 1, True, seed=5, device=device, reduce_arch=_HANDMADE_REDUCE)
    reduce_arch = arch[net.space.cell_length:]
    assert 0 in cell_schedule(tuple(reduce_arch), True, net.table).loose  # the case this test is about
    code = supernet_cell_code(net, 1, reduce_arch)
    assert bool((code[..., FLAGS] & FLAG_BN1).any()) and bool((code[..., FLAGS] & FLAG_BN2).any())


def test_fused_cell_on_references(monkeypatch):
    """Without compiled kernels the wrappers fall back to the references, with the same results."""
    monkeypatch.setattr(extension, "has_kernel", lambda *args, **kwargs: False)
    _check_fused_equals_eager("middle", 1, True, seed=7, reduce_arch=_HANDMADE_REDUCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [False, True])
def test_fused_nodes_gradcheck(device, reduction):
    """The cell-level autograd node (one backward for all nodes, source gradients summed in place) against
    finite differences in float64, drop-path on, every op of the middle set over the three nodes' branches."""
    if not cell_nodes.has_fused_nodes(device):
        pytest.skip(f"bnao._C has no fused-node kernels for {device}")
    from bnao.ops.fused.cell_nodes import fused_nodes

    gen = torch.Generator().manual_seed(3 + int(reduction))
    table = op_table("middle")
    cell = (0, 2, 1, 3, 2, 5, 0, 9, 3, 8, 1, 1)  # sep3, sep5, dil3, max, avg, identity over 3 nodes
    code = cell_code(cell, reduction, table, slot_row=lambda n, b, i, o: 0).to(device)
    s0, s1 = (torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
              for _ in range(2))
    weights = [[(torch.randn(2, *fused.role_shape(role, 3), generator=gen, dtype=torch.float64) * 0.5 + (
        1.0 if role[0] == "g" else 0.0)).to(device).requires_grad_() for _node in range(3)]
        for role in fused.FUSED_ROLES]
    mask = (torch.rand(2, 6, generator=gen, dtype=torch.float64) < 0.8).double().div(0.8).to(device)

    def nodes_only(a, b, *flat):
        per_role = [flat[r * 3 : (r + 1) * 3] for r in range(len(fused.FUSED_ROLES))]
        return tuple(fused_nodes(a, b, code, per_role, mask, reduction, 1e-5)[0])

    flat = [w for role in weights for w in role]
    assert torch.autograd.gradcheck(nodes_only, (s0, s1, *flat), fast_mode=True, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("own_inputs", [True, False])
def test_fused_nodes_and_combine_gradcheck(device, own_inputs):
    """Nodes and combine as one autograd node against finite differences in float64: the combine reading the
    cell inputs themselves (normal cells: their buffers start from its gradient) or separate states 0 and 1
    (reduction cells: their gradients returned apart), with a mask that leaves input 1 and node 1 out."""
    if not (cell_nodes.has_fused_nodes(device) and extension.has_kernel("combine", device)):
        pytest.skip(f"bnao._C has no fused-node or combine kernels for {device}")
    from bnao.ops.fused.cell_nodes import fused_nodes_and_combine

    gen = torch.Generator().manual_seed(11 + int(own_inputs))
    table = op_table("middle")
    cell = (0, 2, 1, 3, 2, 5, 0, 9, 3, 8, 1, 1)  # sep3, sep5, dil3, max, avg, identity over 3 nodes
    code = cell_code(cell, False, table, slot_row=lambda n, b, i, o: 0).to(device)

    def tensor(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device).requires_grad_()

    s0, s1, c0, c1 = (tensor(2, 3, 5, 4) for _ in range(4))
    weights = [[tensor(2, *fused.role_shape(role, 3), scale=0.5, shift=1.0 if role[0] == "g" else 0.0)
                for _node in range(3)] for role in fused.FUSED_ROLES]
    combine_weight = tensor(3, 5, 3, scale=0.5)
    loose = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64, device=device)
    mask = (torch.rand(2, 6, generator=gen, dtype=torch.float64) < 0.8).double().div(0.8).to(device)

    def cell_output(a, b, x0, x1, w, *flat):
        per_role = [flat[r * 3 : (r + 1) * 3] for r in range(len(fused.FUSED_ROLES))]
        inputs = None if own_inputs else (x0, x1)
        return fused_nodes_and_combine(a, b, code, per_role, mask, False, 1e-5, inputs, w, loose)[0]

    flat = [w for role in weights for w in role]
    assert torch.autograd.gradcheck(cell_output, (s0, s1, c0, c1, combine_weight, *flat), fast_mode=True,
                                    atol=1e-6, rtol=1e-4)
    # Against the two autograd nodes it replaces: the nodes, then the combine op on their states.
    from bnao.ops.fused.cell_nodes import fused_nodes
    from bnao.ops.fused.combine import combine

    per_role = [flat[r * 3 : (r + 1) * 3] for r in range(len(fused.FUSED_ROLES))]
    states = fused_nodes(s0, s1, code, per_role, mask, False, 1e-5)[0]
    want = combine([s0, s1, *states] if own_inputs else [c0, c1, *states], combine_weight, loose)
    got = cell_output(s0, s1, c0, c1, combine_weight, *flat)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = torch.randn_like(got)
    inputs = (s0, s1, c0, c1, combine_weight, *flat)
    got_grads = torch.autograd.grad(got, inputs, grad, allow_unused=True)
    want_grads = torch.autograd.grad(want, inputs, grad, allow_unused=True)
    for got_grad, want_grad in zip(got_grads, want_grads):
        if want_grad is None:
            assert got_grad is None or not got_grad.any()
        else:
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_fused_cell_refuses_running_statistics():
    code = cell_code((0, 1, 1, 1), False, op_table("middle"))
    x = torch.randn(1, 2, 3, 3)
    zeros = fused.NodeWeights(*(torch.zeros(1, 2, *fused.role_shape(r, 2)) for r in fused.FUSED_ROLES))
    with pytest.raises(ValueError, match="eager path"):
        fused.fused_cell(x, x, code, zeros, (), (torch.zeros(2, 3, 2), torch.ones(2), torch.zeros(2)),
                         CellBuffers(None, (), (torch.zeros(2), torch.ones(2))), fused.loose_mask(code),
                         reduction=False, batch_stats=False)


# ------------------------------------------------------------------ hostile inputs
# The compiled ops fed with hostile tensors (any dtype, rank, layout, device "meta", absurd values and
# sizes): an error or a well-formed result, never a crash. Strategies of tests/test_fuzz_ops.py.
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fuzz_ops import FLOATS, INT64, REFUSALS, SCALE, _returns_or_refuses, hostile_tensors  # noqa: E402

FUZZ_FEW = settings(max_examples=int(40 * SCALE), deadline=None, suppress_health_check=list(HealthCheck),
                    database=None)
SIZES = st.lists(st.one_of(st.integers(-2, 7), st.sampled_from([2**31, 2**62])), max_size=5)
INDICES = hostile_tensors(st.one_of(st.integers(-2, 4), INT64))


@FUZZ_FEW
@given(st.lists(hostile_tensors(FLOATS), max_size=3), INDICES, INDICES, SIZES, hostile_tensors(FLOATS))
def test_gather_rows_refuses_hostile_inputs(stacks, select, rows, shape, grad):
    _require_kernels("cpu")
    out = _returns_or_refuses(torch.ops.bnao.gather_rows, stacks, select, rows, shape)
    if out is not None:
        assert out.shape == (select.shape[0], *shape)
    grads = _returns_or_refuses(torch.ops.bnao.gather_rows_backward, grad, select, rows, shape)
    if grads is not None:
        per_stack = grad.dim()
        assert [tuple(g.shape) for g in grads] == [tuple(shape[i : i + per_stack])
                                                   for i in range(0, len(shape), per_stack)]


@FUZZ_FEW
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 3)), min_size=1, max_size=3),
       # Mostly stacks that exist and rows inside them, so that most draws gather real rows.
       st.lists(st.tuples(st.sampled_from([0, 1, 0, 1, 2, -1, -2, 3]), st.sampled_from([0, 1, 2, 0, 1, 3, -1, 4])),
                min_size=1, max_size=6, unique=True))
def test_gather_rows_valid_layouts_match_the_reference_or_are_refused(layouts, pairs):
    """Random stacks and indices: the reference's result, or a refusal naming a real violation."""
    _require_kernels("cpu")
    stacks = [torch.randn(rows, 2, k, k, dtype=torch.float64) for rows, k in layouts]
    select = torch.tensor([s for s, _ in pairs], dtype=torch.int64)
    rows = torch.tensor([r for _, r in pairs], dtype=torch.int64)
    out = _returns_or_refuses(torch.ops.bnao.gather_rows, stacks, select, rows, [2, 3, 3])
    used = [(s, r) for s, r in pairs if s >= 0]
    valid = all(s < len(stacks) and 0 <= r < stacks[s].shape[0] for s, r in used) and len(set(used)) == len(used)
    assert (out is not None) == valid
    if valid:
        event("gather: valid, rows gathered" if used else "gather: valid, all padding")
        torch.testing.assert_close(out, gather_rows_reference(stacks, select, rows, [2, 3, 3]), rtol=0, atol=0)
    else:
        event("gather: refused")


@st.composite
def node_inputs(draw):
    """node_output arguments of valid shapes with hostile values: any kind and flag bits, non-finite floats."""
    batch, channels, side = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))

    def floats(*shape):
        values = draw(st.lists(FLOATS, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        return torch.tensor(values, dtype=torch.float64).reshape(shape)

    code = torch.tensor(draw(st.lists(st.integers(-3, 2**31 - 1) | st.integers(-3, 8), min_size=18, max_size=18)),
                        dtype=torch.int32).reshape(2, 9)
    stats = [floats(2, channels) for _ in range(4)]
    mask = floats(batch, 2) if draw(st.booleans()) else None
    return floats(2, batch, channels, side, side), code, stats, mask


@FUZZ_FEW
@given(node_inputs())
def test_node_output_hostile_values_match_the_reference(inputs):
    _require_kernels("cpu")
    pre, code, stats, mask = inputs
    out = torch.ops.bnao.node_output(pre, code, *stats, mask)
    ref = node_output_reference(pre, code, tuple(stats), mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0, equal_nan=True)
    grads = torch.ops.bnao.node_output_backward(torch.ones_like(out), pre, code, *stats[:3], mask)
    assert grads[0].shape == pre.shape and all(g.shape == stats[0].shape for g in grads[1:])


@FUZZ_FEW
@given(st.lists(hostile_tensors(FLOATS), min_size=4, max_size=4), INDICES, FLOATS, FLOATS, INT64)
def test_update_slot_stats_refuses_hostile_inputs(tensors, bn_rows, momentum, eps, count):
    _require_kernels("cpu")
    running_mean, running_var, mean, invstd = tensors
    before = (running_mean.clone(), running_var.clone())
    try:
        torch.ops.bnao.update_slot_stats(running_mean, running_var, bn_rows, mean, invstd, momentum, eps, count)
    except REFUSALS:
        return  # refused (update_slot_stats returns None either way, so _returns_or_refuses cannot tell)
    if any(t.device.type == "meta" for t in (*tensors, bn_rows)):
        return  # the fake kernel ran (shapes only)
    # The CPU kernel ran: the running rows that bn_rows does not name are untouched.
    named = {int(r) for r in bn_rows.tolist() if r >= 0}
    for row in range(running_mean.shape[0]):
        if row not in named:
            torch.testing.assert_close(running_mean[row], before[0][row], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(running_var[row], before[1][row], rtol=0, atol=0, equal_nan=True)

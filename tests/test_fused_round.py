"""bnao::branch_round and its backward against the pure-PyTorch reference (csrc/cell/DESIGN.md).

The reference (``branch_round_reference``) reads the branch code on the host and is built from
``F.conv2d``/pooling/einsum, so it is independent of the kernels' code. Every case compares the
forward results and the gradients of every float input (through ``torch.autograd.grad`` on both
sides); float64 ``gradcheck`` and ``opcheck`` run on a few cases.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bnao import extension
from bnao.ops.fused import round as fused_round
from bnao.ops.fused.code import FLAG_BN1, FLAGS, INPUT, KIND, STRIDE, cell_code
from bnao.ops.fused.reference import branch_round_reference
from bnao.space import NAOSpace
from bnao.space.ops import (
    KIND_AVG_POOL,
    KIND_DIL_SEP_CONV,
    KIND_IDENTITY,
    KIND_MAX_POOL,
    KIND_SEP_CONV,
    KIND_ZERO,
    op_table,
)
from conftest import DEVICES

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not extension.has_ops(), reason=f"bnao._C not loaded: {extension.load_error()}"),
]

NUM_NODES = 3
EPS = 1e-5


def _require_kernel(device: str) -> None:
    # With the core loaded, a missing kernel is a build bug, not a reason to skip.
    assert fused_round.has_compiled_branch_round(device), f"bnao._C has no branch_round kernel for {device}"


def covering_cells(op_set: str, seed: int):
    """Random cells of ``op_set`` (B=3) in which every op appears on a cell input and on a node.

    Node 0's first branch reads a cell input (stride 2 in a reduction cell) and node 2's second
    branch reads node 1 (stride 1), each with op ``o``, for every op ``o``; the rest is random.
    """
    space = NAOSpace(num_nodes=NUM_NODES, op_set=op_set)
    archs = space.sample_array(space.num_ops, np.random.default_rng(seed))
    cells = []
    for op, arch in enumerate(archs):
        cell = [int(v) for v in arch[: space.cell_length]]
        cell[1] = op  # node 0, branch 0: op (its input is 0 or 1)
        cell[4 * 2 + 2], cell[4 * 2 + 3] = 3, op  # node 2, branch 1: reads node 1 with op
        space.validate(cell + cell)
        cells.append(cell)
    return cells


def make_sources(node: int, batch: int, channels: int, height: int, width: int, reduction: bool, dtype, device, gen):
    """States 0 .. node+1 of a cell: inputs H x W, nodes at the cell's node resolution."""
    out_h, out_w = ((height + 1) // 2, (width + 1) // 2) if reduction else (height, width)
    shapes = [(height, width)] * 2 + [(out_h, out_w)] * node
    return [torch.randn(batch, channels, h, w, generator=gen, dtype=dtype).to(device) for h, w in shapes]


def make_weights(channels: int, dtype, device, gen):
    dw = torch.randn(2, channels, 7, 7, generator=gen, dtype=dtype) * 0.3
    pw = torch.randn(2, channels, channels, generator=gen, dtype=dtype) * 0.5
    return dw.to(device), pw.to(device)


def make_norm(channels: int, dtype, device, gen):
    mean = torch.randn(2, channels, generator=gen, dtype=dtype)
    invstd = torch.rand(2, channels, generator=gen, dtype=dtype) + 0.5
    gamma = torch.randn(2, channels, generator=gen, dtype=dtype)
    beta = torch.randn(2, channels, generator=gen, dtype=dtype)
    return tuple(t.to(device) for t in (mean, invstd, gamma, beta))


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_both(sources, code, round_index, dw, pw, norm, reduction, device):
    """Forward and all gradients of the compiled op and of the reference, for the same random loss."""
    results = []
    gen = torch.Generator().manual_seed(1)
    upstream = None
    for compiled in (True, False):
        src, (w_dw, w_pw) = leaves(sources), leaves((dw, pw))
        nrm = tuple(leaves(norm)) if norm is not None else None
        if compiled:
            outs = fused_round.branch_round(src, code.to(device), round_index, w_dw, w_pw, nrm, EPS,
                                            reduction=reduction)
        else:
            outs = branch_round_reference([s.cpu() for s in src], code.cpu(), round_index, w_dw.cpu(), w_pw.cpu(),
                                          tuple(t.cpu() for t in nrm) if nrm else None, EPS)
        if upstream is None:
            upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
        loss = sum((o * u.to(o.device)).sum() for o, u in zip(outs, upstream))
        inputs = src + [w_dw, w_pw] + (list(nrm) if nrm else [])
        # A node of two zero branches (reference) has outputs that depend on no input at all.
        grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else [None] * len(inputs)
        grads = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]
        results.append(([o.detach().cpu() for o in outs], [g.cpu() for g in grads]))
    return results


def check_case(sources, code, round_index, dw, pw, norm, reduction, device, what):
    (outs, grads), (ref_outs, ref_grads) = run_both(sources, code, round_index, dw, pw, norm, reduction, device)
    for name, got, want in zip(("pre", "mean", "invstd"), outs, ref_outs):
        torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {name}: {m}")
    for k, (got, want) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(got, want, msg=lambda m: f"{what}: grad of input {k}: {m}")
    if round_index == 1:
        read = {int(code[b, INPUT]) for b in range(2)}
        for s in range(len(sources)):
            if s not in read:  # exactly zero, not just close
                assert torch.equal(grads[s], torch.zeros_like(grads[s])), f"{what}: unread source {s} got a gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_set", ["small", "middle"])
@pytest.mark.parametrize("reduction", [False, True])
@pytest.mark.parametrize("height", [5, 6])
def test_matches_reference(device, op_set, reduction, height):
    _require_kernel(device)
    width, channels, batch = 11 - height, 4 if height == 6 else 5, 2  # odd and even H and W; odd C too
    gen = torch.Generator().manual_seed(height + 10 * reduction)
    table = op_table(op_set)
    seen = set()
    for cell in covering_cells(op_set, seed=height):
        codes = cell_code(cell, reduction, table)
        for node in range(NUM_NODES):
            code = codes[node]
            seen.update((int(code[b, KIND]), int(code[b, STRIDE])) for b in range(2))
            dw, pw = make_weights(channels, torch.float64, device, gen)
            sources = make_sources(node, batch, channels, height, width, reduction, torch.float64, device, gen)
            what = f"{op_set} reduction={reduction} H={height} node {node} code {code.tolist()}"
            check_case(sources, code, 1, dw, pw, None, reduction, device, what + " round 1")
            out_h, out_w = sources[-1].shape[-2:] if node else (((height + 1) // 2, (width + 1) // 2) if reduction
                                                                 else (height, width))
            pre1 = torch.randn(2, batch, channels, out_h, out_w, generator=gen, dtype=torch.float64).to(device)
            norm = make_norm(channels, torch.float64, device, gen)
            check_case([pre1], code, 2, dw, pw, norm, False, device, what + " round 2")
    kinds = {kind for kind, _ in seen}
    expected = {KIND_SEP_CONV, KIND_AVG_POOL, KIND_MAX_POOL, KIND_IDENTITY}
    if op_set == "middle":
        expected |= {KIND_ZERO, KIND_DIL_SEP_CONV}
    assert kinds == expected
    if reduction:  # every kind at stride 2 (cell inputs) and stride 1 (nodes)
        assert {(k, s) for k in expected for s in (1, 2)} <= seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [False, True])
def test_wide_rows_match_reference(device, reduction):
    # Rows wider than the CPU kernel's 64-column chunks, with interior and border pixels for every
    # kernel size: the vectorised column paths against the reference.
    _require_kernel(device)
    gen = torch.Generator().manual_seed(21 + reduction)
    table = op_table("middle")
    for cell in covering_cells("middle", seed=17):
        codes = cell_code(cell, reduction, table)
        for node in (0, 2):
            dw, pw = make_weights(2, torch.float64, device, gen)
            sources = make_sources(node, 1, 2, 9, 135, reduction, torch.float64, device, gen)
            what = f"wide reduction={reduction} node {node} code {codes[node].tolist()}"
            check_case(sources, codes[node], 1, dw, pw, None, reduction, device, what + " round 1")
            pre1 = torch.randn(2, 1, 2, *sources[-1].shape[-2:] if node else
                               (((9 + 1) // 2, (135 + 1) // 2) if reduction else (9, 135)),
                               generator=gen, dtype=torch.float64).to(device)
            norm = make_norm(2, torch.float64, device, gen)
            check_case([pre1], codes[node], 2, dw, pw, norm, False, device, what + " round 2")


@pytest.mark.parametrize("device", DEVICES)
def test_split_reductions_match_reference(device):
    # N=5, C=3, 48x48: 11,520 terms per BN statistic and weight-gradient sum, so on CUDA every reduction of
    # the round runs split over two chunks of blocks plus a second pass (csrc/cell/reduction_split.h; the
    # C++ test test_reduction_split runs the same split on the CPU). Smaller cases run one chunk.
    _require_kernel(device)
    gen = torch.Generator().manual_seed(48)
    cell = covering_cells("middle", seed=5)[3]  # sep5 on node 0's first branch and node 2's second
    codes = cell_code(cell, False, op_table("middle"))
    for node in (0, 2):
        dw, pw = make_weights(3, torch.float64, device, gen)
        sources = make_sources(node, 5, 3, 48, 48, False, torch.float64, device, gen)
        what = f"split node {node} code {codes[node].tolist()}"
        check_case(sources, codes[node], 1, dw, pw, None, False, device, what + " round 1")
        pre1 = torch.randn(2, 5, 3, 48, 48, generator=gen, dtype=torch.float64).to(device)
        check_case([pre1], codes[node], 2, dw, pw, make_norm(3, torch.float64, device, gen), False, device,
                   what + " round 2")
    # A reduction cell at C=10 (two 8-channel tiles per side, the factorized reduce's even and odd halves
    # meeting inside the first) from 63x63 inputs: N=8 x 32 x 32 = 8,192 terms, two chunks of the tiles.
    cell = covering_cells("middle", seed=5)[1]  # identity (the factorized reduce) on node 0's first branch
    code = cell_code(cell, True, op_table("middle"))[0]
    dw, pw = make_weights(10, torch.float64, device, gen)
    sources = make_sources(0, 8, 10, 63, 63, True, torch.float64, device, gen)
    check_case(sources, code, 1, dw, pw, None, True, device, f"split reduction cell code {code.tolist()}")


@pytest.mark.parametrize("device", DEVICES)
def test_float32_matches_reference(device):
    _require_kernel(device)
    gen = torch.Generator().manual_seed(3)
    table = op_table("middle")
    for cell in covering_cells("middle", seed=7)[:4]:
        code = cell_code(cell, True, table)[2]
        dw, pw = make_weights(6, torch.float32, device, gen)
        sources = make_sources(2, 3, 6, 7, 6, True, torch.float32, device, gen)
        (outs, _), (ref_outs, _) = run_both(sources, code, 1, dw, pw, None, True, device)
        for got, want in zip(outs, ref_outs):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def gradcheck_cases():
    """(code, round, reduction): round 1 of every kind (both strides) and round 2 with BN1 inputs."""
    table = op_table("middle")
    cells = covering_cells("middle", seed=11)
    cases = []
    for op in (0, 1, 2, 5, 8, 9):  # zero, identity (FR at stride 2), sep 3x3, dil sep 3x3, avg, max
        cases.append((cell_code(cells[op], True, table)[0], 1, True))
        cases.append((cell_code(cells[op], False, table)[2], 1, False))
    # Round 2: sep conv after sep conv (BN1 prologue into a conv, BN2 stats); FR and dil conv (prologue
    # passed through, no BN2).
    for op in (2, 1, 5):
        cases.append((cell_code(cells[op], True, table)[0], 2, False))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(gradcheck_cases())))
def test_gradcheck(device, case):
    _require_kernel(device)
    code, round_index, reduction = gradcheck_cases()[case]
    gen = torch.Generator().manual_seed(case)
    channels, batch, height, width = 2, 2, 5, 4
    dw, pw = make_weights(channels, torch.float64, device, gen)
    if round_index == 1:
        sources = make_sources(0 if reduction else 2, batch, channels, height, width, reduction, torch.float64, device,
                               gen)
        norm = ()
    else:
        sources = [torch.randn(2, batch, channels, 3, 3, generator=gen, dtype=torch.float64).to(device)]
        norm = make_norm(channels, torch.float64, device, gen)
    num_sources = len(sources)
    code = code.to(device)

    def fn(*inputs):
        src, rest = list(inputs[:num_sources]), inputs[num_sources:]
        nrm = tuple(rest[2:]) if round_index == 2 else None
        return fused_round.branch_round(src, code, round_index, rest[0], rest[1], nrm, EPS, reduction=reduction)

    inputs = leaves(sources + [dw, pw] + list(norm))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _require_kernel(device)
    gen = torch.Generator().manual_seed(5)
    table = op_table("middle")
    cells = covering_cells("middle", seed=13)
    dw, pw = make_weights(4, torch.float64, device, gen)
    code1 = cell_code(cells[2], True, table)[1].to(device)
    sources = leaves(make_sources(1, 2, 4, 5, 5, True, torch.float64, device, gen))
    op = torch.ops.bnao.branch_round.default
    torch.library.opcheck(op, (sources, code1, 1, *leaves((dw, pw)), None, None, None, None, EPS, True))
    code2 = cell_code(cells[2], False, table)[0].to(device)
    pre1 = torch.randn(2, 2, 4, 5, 5, generator=gen, dtype=torch.float64).to(device)
    norm = leaves(make_norm(4, torch.float64, device, gen))
    torch.library.opcheck(op, ([pre1.requires_grad_()], code2, 2, *leaves((dw, pw)), *norm, EPS, False))


@pytest.mark.parametrize("reduction", ["omitted", "keyword False", "positional False", "keyword True"])
def test_autograd_through_every_way_of_passing_reduction(reduction):
    """The registered autograd formula, as torch calls it, however `reduction` is passed (or left out)."""
    gen = torch.Generator().manual_seed(6)
    is_reduction = reduction.endswith("True")
    code = cell_code(covering_cells("middle", seed=2)[2], is_reduction, op_table("middle"))[2]
    dw, pw = leaves(make_weights(3, torch.float64, "cpu", gen))
    sources = leaves(make_sources(2, 2, 3, 6, 6, is_reduction, torch.float64, "cpu", gen))
    args = (sources, code, 1, dw, pw, None, None, None, None, EPS)
    op = torch.ops.bnao.branch_round
    outs = {"omitted": lambda: op(*args), "keyword False": lambda: op(*args, reduction=False),
            "positional False": lambda: op(*args, False), "keyword True": lambda: op(*args, reduction=True)}[reduction]()
    sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs).backward()
    assert dw.grad is not None and pw.grad is not None and all(s.grad is not None for s in sources)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    # Reductions have a fixed order (no atomics): repeated calls, and on the CPU any thread count,
    # give the same bits.
    _require_kernel(device)
    gen = torch.Generator().manual_seed(8)
    code = cell_code(covering_cells("middle", seed=3)[2], True, op_table("middle"))[0].to(device)
    dw, pw = make_weights(6, torch.float32, device, gen)
    sources = make_sources(0, 4, 6, 17, 16, True, torch.float32, device, gen)
    args = (sources, code, 1, dw, pw, None, None, None, None, EPS, True)
    first = torch.ops.bnao.branch_round(*args)
    grads = [torch.randn(t.shape, generator=gen).to(device) for t in first]
    first_backward = torch.ops.bnao.branch_round_backward(*grads, *args[:9], *first, True)
    threads = torch.get_num_threads()
    try:
        for num_threads in ({1, 2} if device == "cpu" else {threads}):
            torch.set_num_threads(num_threads)
            again = torch.ops.bnao.branch_round(*args)
            again_backward = torch.ops.bnao.branch_round_backward(*grads, *args[:9], *again, True)
            assert all(torch.equal(x, y) for x, y in zip(first, again))
            flat = lambda result: list(result[0]) + list(result[1:])  # noqa: E731
            assert all(torch.equal(x, y) for x, y in zip(flat(first_backward), flat(again_backward)))
    finally:
        torch.set_num_threads(threads)


def test_arguments_are_checked():
    _require_kernel("cpu")
    gen = torch.Generator().manual_seed(0)
    code = cell_code([0, 0, 1, 1, 2, 2, 0, 3, 1, 4, 2, 0], True, op_table("small"))[0]
    dw, pw = make_weights(3, torch.float64, "cpu", gen)
    sources = make_sources(0, 2, 3, 6, 6, True, torch.float64, "cpu", gen)
    op = torch.ops.bnao.branch_round
    with pytest.raises(RuntimeError, match="code must be the node's int32"):
        op(sources, code.long(), 1, dw, pw, None, None, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="needs 2"):  # stride 2 needed for a cell input of a reduction cell
        op(sources, cell_code([0, 0, 1, 1, 2, 2, 0, 3, 1, 4, 2, 0], False, op_table("small"))[0], 1, dw, pw,
           None, None, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="dw must be Double for Double sources"):
        op(sources, code, 1, dw.float(), pw, None, None, None, None, EPS, True)
    # bfloat16 activations take float32 weights (bf16 storage, fp32 arithmetic), not bfloat16 ones.
    with pytest.raises(RuntimeError, match="pw must be Float for BFloat16 sources"):
        op([s.bfloat16() for s in sources], code, 1, dw.float(), pw.bfloat16(), None, None, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="sources must be float32, float64 or bfloat16"):
        op([s.half() for s in sources], code, 1, dw.float(), pw.float(), None, None, None, None, EPS, True)
    with pytest.raises(RuntimeError, match=r"sources\[1\] \(a cell input\) must have shape"):
        op([sources[0], sources[1][:, :, :4]], code, 1, dw, pw, None, None, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op([sources[0], sources[1].transpose(2, 3)], code, 1, dw, pw, None, None, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="pass None in round 1"):
        op(sources, code, 1, dw, pw, torch.zeros(2, 3, dtype=torch.float64), None, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="round 2 needs in_gamma"):
        pre1 = torch.zeros(2, 2, 3, 3, 3, dtype=torch.float64)
        stats = torch.ones(2, 3, dtype=torch.float64)
        op([pre1], code, 2, dw, pw, stats, stats, None, None, EPS, False)
    bad = code.clone()
    bad[1, INPUT] = 5
    with pytest.raises(RuntimeError, match="reads state 5 but only 2 sources"):
        op(sources, bad, 1, dw, pw, None, None, None, None, EPS, True)


def test_round2_prologue_applies_only_with_bn1():
    # Sanity of the test set-up itself: the covering cells give round-2 cases with and without BN1.
    table = op_table("middle")
    flags = {bool(int(cell_code(c, False, table)[n][b, FLAGS]) & FLAG_BN1)
             for c, n, b in itertools.product(covering_cells("middle", 1), range(NUM_NODES), range(2))}
    assert flags == {True, False}


# ------------------------------------------------------------------ backward that accumulates
def _accumulate_case(device, dtype, seed):
    """A round-1 node of a reduction cell (every op kind covered over seeds) with its forward results."""
    gen = torch.Generator().manual_seed(seed)
    table = op_table("middle")
    cell = covering_cells("middle", seed=seed)[seed % len(table)]
    code = cell_code(cell, True, table)[2].to(device)  # node 2 reads 4 states
    sources = make_sources(2, 2, 4, 6, 5, True, dtype, device, gen)
    dw, pw = make_weights(4, dtype, device, gen)
    pre, mean, invstd = torch.ops.bnao.branch_round(sources, code, 1, dw, pw, None, None, None, None, EPS, True)
    grads = [torch.randn(t.shape, generator=gen, dtype=dtype).to(device) for t in (pre, mean, invstd)]
    return gen, code, sources, dw, pw, (pre, mean, invstd), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_backward_accumulate_adds_the_reference_gradients(device, seed):
    # Buffers + the reference's source gradients (autograd through branch_round_reference), and the
    # reference's weight gradients: independent of the compiled kernels.
    _require_kernel(device)
    gen, code, sources, dw, pw, outs, grads = _accumulate_case(device, torch.float64, seed)
    buffers = [torch.randn(s.shape, generator=gen, dtype=torch.float64).to(device) for s in sources]
    before = [b.clone() for b in buffers]
    grad_dw, grad_pw = torch.ops.bnao.branch_round_backward_accumulate(buffers, *grads, sources, code, dw, pw, *outs,
                                                                       True)
    src, weights = leaves([s.cpu() for s in sources]), leaves((dw.cpu(), pw.cpu()))
    ref = branch_round_reference(src, code.cpu(), 1, *weights, None, EPS)
    loss = sum((o * g.cpu()).sum() for o, g in zip(ref, grads))
    ref_grads = torch.autograd.grad(loss, src + weights, allow_unused=True)
    ref_grads = [torch.zeros_like(i) if g is None else g for i, g in zip(src + weights, ref_grads)]
    for s, (buffer, start) in enumerate(zip(buffers, before)):
        torch.testing.assert_close(buffer.cpu(), start.cpu() + ref_grads[s], msg=lambda m: f"source {s}: {m}")
    torch.testing.assert_close(grad_dw.cpu(), ref_grads[-2])
    torch.testing.assert_close(grad_pw.cpu(), ref_grads[-1])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_accumulate_overwrites_the_first_buffers(device):
    # overwrite_below=2: sources 0 and 1 get the gradient itself (their buffers held NaN), the others
    # buffer + gradient; compared with the op's own accumulation into zeros (checked against the reference
    # above) and with the plain backward's dense gradients.
    _require_kernel(device)
    gen, code, sources, dw, pw, outs, grads = _accumulate_case(device, torch.float64, 1)
    start = [torch.randn(s.shape, generator=gen, dtype=torch.float64).to(device) for s in sources]
    buffers = [torch.full_like(s, float("nan")) for s in sources[:2]] + [b.clone() for b in start[2:]]
    op = torch.ops.bnao.branch_round_backward_accumulate
    op(buffers, *grads, sources, code, dw, pw, *outs, True, 2)
    dense = torch.ops.bnao.branch_round_backward(*grads, sources, code, 1, dw, pw, None, None, None, None, *outs,
                                                 True)[0]
    for s, buffer in enumerate(buffers[:2]):  # the same sums as the dense backward's: equal bits
        torch.testing.assert_close(buffer, dense[s], rtol=0, atol=0, msg=lambda m: f"source {s}: {m}")
    for s, buffer in enumerate(buffers[2:], start=2):  # start + branch 0 + branch 1: rounding of the order only
        torch.testing.assert_close(buffer, start[s] + dense[s], msg=lambda m: f"source {s}: {m}")
    with pytest.raises(RuntimeError, match="overwrite_below"):
        op(buffers, *grads, sources, code, dw, pw, *outs, True, len(sources) + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_accumulate_opcheck_and_errors(device):
    _require_kernel(device)
    gen, code, sources, dw, pw, outs, grads = _accumulate_case(device, torch.float64, 5)
    buffers = [torch.zeros_like(s) for s in sources]
    op = torch.ops.bnao.branch_round_backward_accumulate
    torch.library.opcheck(op.default, (buffers, *grads, sources, code, dw, pw, *outs, True))
    with pytest.raises(RuntimeError, match="one tensor per source"):
        op(buffers[:-1], *grads, sources, code, dw, pw, *outs, True)
    with pytest.raises(RuntimeError, match="shares memory with a source"):
        op([sources[0]] + buffers[1:], *grads, sources, code, dw, pw, *outs, True)
    # One launch writes every same-shaped source's gradient: the buffers must not overlap, not even as views
    # of one tensor that start at different elements.
    with pytest.raises(RuntimeError, match=r"grad_sources\[0\] and grad_sources\[1\] share memory"):
        op([buffers[0], buffers[0]] + buffers[2:], *grads, sources, code, dw, pw, *outs, True)
    shared = torch.zeros(buffers[0].numel() + 1, dtype=buffers[0].dtype, device=device)
    overlapping = [shared[:-1].view_as(buffers[0]), shared[1:].view_as(buffers[0])]
    with pytest.raises(RuntimeError, match="share memory"):
        op(overlapping + buffers[2:], *grads, sources, code, dw, pw, *outs, True)
    with pytest.raises(RuntimeError, match="grad_sources"):
        op([b.float() for b in buffers], *grads, sources, code, dw, pw, *outs, True)

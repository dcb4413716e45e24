"""bfloat16 mode of the fused path: bf16 activations, float32 weights, statistics and arithmetic.

The ops are compared with the float64 pure-PyTorch references run on the very values the kernels read
(bf16 activations and float32 weights, both exactly representable in float64), so the only differences are
the kernels' own roundings. Where they come from, and the tolerances they justify (u = 2^-9, bf16's unit
roundoff; errors are norm-wise, ``||got - want|| / ||want||``):

* forward results: ``pre`` is stored in bf16 (u), after the depthwise result ``mid`` was stored in bf16 (u,
  spread over the C-term pointwise sum): about 2u, so 1e-2 (5u);
* batch statistics are accumulated in float32 over N*H*W values: against float64 statistics of the stored
  ``pre`` they agree to float32 precision (1e-6 here; a bf16 running sum over 1,024 values would be off by
  about 1e-2), and to the reference's like ``pre`` does;
* gradients: the incoming gradient and the scratch gradients (``grad_total``, ``grad_mid``, ``grad_source``)
  are stored in bf16 (u each) and the per-channel parameter gradients are sums over N*H*W of such values, in
  which the signs cancel, so the relative error grows by the cancellation: 2e-2 for source gradients, 8e-2
  for parameter gradients (measured: at most 1e-2 and 3.5e-2 over these cases).

Then the supernet: under ``torch.autocast(bfloat16)`` the training step takes the fused cells, its weights and
gradients stay float32, and along a float32 run each step's bf16 loss and gradient are as close to float32's
as those of the eager cells under the same autocast. The device-data (graph) step is compared with it bit for
bit in tests/test_graph_step.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bnao import extension
from bnao.ops.fused import nodes
from bnao.ops.fused import round as fused_round
from bnao.ops.fused.code import FLAG_BN1, FLAGS, cell_code
from bnao.ops.fused.reference import branch_round_reference, node_output_reference
from bnao.space import NAOSpace
from bnao.space.ops import op_table
from bnao.supernet import Supernet
from bnao.supernet.fused_forward import fused_built
from bnao.supernet.precision import bf16_fidelity, summarize
from conftest import DEVICES
from test_fused_round import EPS, covering_cells, make_norm, make_sources, make_weights

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not extension.has_ops(), reason=f"bnao._C not loaded: {extension.load_error()}"),
]

BF16 = torch.bfloat16
FORWARD_TOL, SOURCE_GRAD_TOL, PARAM_GRAD_TOL, STATS_OWN_TOL = 1e-2, 2e-2, 8e-2, 1e-6


def _require(device: str) -> None:
    if not fused_built(torch.device(device).type):
        pytest.skip(f"the fused-cell ops are not built for {device}")


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.double().cpu()).norm() / want.double().norm().clamp_min(1e-30))


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(True) for t in tensors]


def _round_case(sources, code, round_index, dw, pw, norm, reduction, device, gen):
    """Compiled bf16 round vs the float64 reference on the same values; returns the errors by name."""
    bf_sources = _leaves([s.to(device) for s in sources], BF16)
    params = _leaves([t.to(device) for t in (dw, pw, *(norm or ()))], torch.float32)
    pre, mean, invstd = fused_round.branch_round(bf_sources, code.to(device), round_index, params[0], params[1],
                                                 tuple(params[2:]) or None, EPS, reduction=reduction)
    assert pre.dtype == BF16 and mean.dtype == invstd.dtype == torch.float32
    ref_sources = _leaves([s.cpu() for s in bf_sources], torch.float64)
    ref_params = _leaves([p.cpu() for p in params], torch.float64)
    ref = branch_round_reference(ref_sources, code, round_index, ref_params[0], ref_params[1],
                                 tuple(ref_params[2:]) or None, EPS)
    errors = {"pre": _relative(pre.detach(), ref[0].detach())}
    # Statistics of the stored bf16 pre, by torch in float64: float32 accumulation gives them to ~1e-7.
    stored = pre.detach().double().cpu()
    own_mean, own_var = stored.mean((1, 3, 4)), stored.var((1, 3, 4), unbiased=False)
    with_bn = ref[2].detach() != 1  # branches without the round's BN report (0, 1)
    if with_bn.any():
        errors["mean (stored pre)"] = _relative(mean.detach()[with_bn], own_mean[with_bn])
        errors["invstd (stored pre)"] = _relative(invstd.detach()[with_bn], (own_var + EPS).rsqrt()[with_bn])
    upstream = [torch.randn(t.shape, generator=gen) for t in ref]
    loss = sum((o.float() * u.to(device)).sum() for o, u in zip((pre, mean, invstd), upstream))
    ref_loss = sum((o * u.double().to(o.dtype)).sum() for o, u in zip(ref, (upstream[0].to(BF16), *upstream[1:])))
    if not ref_loss.requires_grad:  # two zero branches: nothing depends on the inputs
        return errors
    inputs, ref_inputs = bf_sources + params, ref_sources + ref_params
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs, allow_unused=True)
    for k, (got, want) in enumerate(zip(grads, ref_grads)):
        want = torch.zeros_like(ref_inputs[k]) if want is None else want
        got = torch.zeros_like(inputs[k]) if got is None else got
        if want.norm() > 0:
            kind = "source grad" if k < len(bf_sources) else "param grad"
            errors[f"{kind} {k}"] = _relative(got, want)
    return errors


def _limit(name: str) -> float:
    if name.startswith("source grad"):
        return SOURCE_GRAD_TOL
    if name.startswith("param grad"):
        return PARAM_GRAD_TOL
    return STATS_OWN_TOL if "stored pre" in name else FORWARD_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_set", ["small", "middle"])
@pytest.mark.parametrize("reduction", [False, True])
def test_bf16_rounds_match_the_float64_reference(device, op_set, reduction):
    _require(device)
    gen = torch.Generator().manual_seed(11)
    checked = 0
    for cell in covering_cells(op_set, seed=5):
        codes = cell_code(cell, reduction, op_table(op_set))
        for node in range(codes.shape[0]):
            sources = make_sources(node, 4, 8, 16, 16, reduction, torch.float64, "cpu", gen)
            dw, pw = make_weights(8, torch.float64, "cpu", gen)
            for round_index in (1, 2):
                if round_index == 2:
                    pre1 = branch_round_reference(sources, codes[node], 1, dw, pw, None, EPS)[0]
                    round_sources, norm = [pre1.detach()], make_norm(8, torch.float64, "cpu", gen)
                else:
                    round_sources, norm = sources, None
                errors = _round_case(round_sources, codes[node], round_index, dw, pw, norm, reduction, device, gen)
                for name, error in errors.items():
                    assert error <= _limit(name), f"cell {cell} node {node} round {round_index}: {name} {error:.2e}"
                checked += len(errors)
    assert checked > 100


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_batch_statistics_accumulate_in_float32(device):
    """Positive results around 1 (sep convs of positive inputs and weights): a bf16 running sum stops growing at
    256 (256 + 1 rounds back to 256), so its mean over 2,048 values would be far off; a float32 one is exact
    to about 1e-7."""
    _require(device)
    code = cell_code([0, 0, 1, 0] * 3, False, op_table("small"))[0]  # sep conv 3x3 on both branches (BN1)
    assert ((code[:, FLAGS] & FLAG_BN1) != 0).all()
    gen = torch.Generator().manual_seed(0)
    sources = [(1.0 + 0.1 * torch.rand(8, 4, 16, 16, generator=gen)).to(BF16).to(device) for _ in range(2)]
    dw = torch.full((2, 4, 7, 7), 1.0 / 9.0, device=device)
    pw = (0.25 + 0.05 * torch.rand(2, 4, 4, generator=gen)).to(device)
    pre, mean, _ = fused_round.branch_round(sources, code.to(device), 1, dw, pw, None, EPS)
    assert (pre > 0.5).float().mean() > 0.5
    torch.testing.assert_close(mean.double(), pre.double().mean((1, 3, 4)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_node_output_matches_the_float64_reference(device):
    _require(device)
    gen = torch.Generator().manual_seed(3)
    table = op_table("middle")
    for arch in [(0, 2, 1, 5), (2, 3, 0, 9), (1, 1, 0, 4)]:
        code = cell_code(arch, False, table)[0]
        pre = torch.randn(2, 4, 6, 5, 5, generator=gen).to(BF16)
        stats = [torch.randn(2, 6, generator=gen) for _ in range(4)]
        stats[1] = stats[1].abs() + 0.5
        mask = (torch.rand(4, 2, generator=gen) > 0.4).float() / 0.6  # 1/keep is not a bf16 number: float32
        got_inputs = _leaves([pre.to(device)], BF16) + _leaves([s.to(device) for s in stats], torch.float32)
        ref_inputs = _leaves([pre], torch.float64) + _leaves(stats, torch.float64)
        out = nodes.node_output(got_inputs[0], code.to(device), *got_inputs[1:], mask.to(device))
        ref = node_output_reference(ref_inputs[0], code, tuple(ref_inputs[1:]), mask.double())
        assert out.dtype == BF16
        assert _relative(out.detach(), ref.detach()) <= FORWARD_TOL
        upstream = torch.randn(out.shape, generator=gen).to(BF16)
        grads = torch.autograd.grad((out.float() * upstream.float().to(device)).sum(), got_inputs)
        ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), ref_inputs)
        assert grads[0].dtype == BF16 and all(g.dtype == torch.float32 for g in grads[1:])
        for k, (got, want) in enumerate(zip(grads, ref_grads)):
            limit = SOURCE_GRAD_TOL if k == 0 else PARAM_GRAD_TOL
            assert _relative(got, want) <= limit, f"{arch}: grad {k}"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_opcheck(device):
    """The fake kernels report bf16 results and float32 statistics, as the kernels do (opcheck compares them);
    the backward ops likewise (their fake kernels under the autograd test)."""
    _require(device)
    gen = torch.Generator().manual_seed(5)
    table = op_table("middle")
    cell = covering_cells("middle", seed=13)[2]
    dw, pw = (t.float().requires_grad_() for t in make_weights(4, torch.float64, device, gen))
    sources = _leaves(make_sources(1, 2, 4, 5, 5, True, torch.float64, device, gen), BF16)
    # Only the dispatch and fake-kernel checks: the autograd test compares bf16 gradients to float32 ones
    # computed by PyTorch's own bf16 ops, which round differently.
    checks = ("test_schema", "test_faketensor")
    op = torch.ops.bnao.branch_round.default
    code1 = cell_code(cell, True, table)[1].to(device)
    torch.library.opcheck(op, (sources, code1, 1, dw, pw, None, None, None, None, EPS, True), test_utils=checks)
    pre1 = torch.randn(2, 2, 4, 5, 5, generator=gen).to(BF16).to(device).requires_grad_()
    norm = _leaves(make_norm(4, torch.float64, device, gen), torch.float32)
    code2 = cell_code(cell, False, table)[0].to(device)
    torch.library.opcheck(op, ([pre1], code2, 2, dw, pw, *norm, EPS, False), test_utils=checks)
    mask = torch.tensor([[2.0, 0.0], [0.0, 2.0]], device=device)
    torch.library.opcheck(torch.ops.bnao.node_output.default, (pre1, code2, *norm, mask), test_utils=checks)


# ------------------------------------------------------------------ the supernet under bf16 autocast
def _net(kernels: str = "fused"):
    torch.manual_seed(0)
    return Supernet(NAOSpace(op_set="middle"), layers=1, channels=8, num_classes=4, in_channels=3, kernels=kernels,
                    seed=7, auxiliary=True)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_steps_compared_with_float32_on_the_same_steps(device):
    """Along a float32 training run (12 SGD steps, a new arch each, drop-path on), each step's loss and gradient
    are also computed with the fused cells under bf16 autocast, and with the eager cells under the same
    autocast (PyTorch's own bf16 arithmetic), from the same weights, batch and drop-path masks
    (:func:`bnao.supernet.precision.bf16_fidelity`).

    Measured (CPU, these 12 steps): loss differences 6.1e-3 on average for fused bf16 and 4.7e-3 for eager bf16;
    gradient cosines with float32 0.87 and 0.85 (this tiny net's gradient is ill-conditioned).
    The bounds: loss differences below 0.02 on average and at most twice eager bf16's plus 0.005, cosines no
    worse than eager bf16's by more than 0.05: room for bf16's own roundings, not for a different computation.
    And above 1e-5: a fused step that silently ran in float32 would not differ from float32 at all.
    """
    _require(device)
    model = _net().to(device)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(32, 3, 16, 16, generator=gen).to(device)
    labels = (images.mean((1, 2, 3)) > 0).long() + 2 * (images[:, 0].mean((1, 2)) > 0).long()
    archs = NAOSpace(op_set="middle").sample_array(12, np.random.default_rng(4))
    result = bf16_fidelity(model, images, labels, archs)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    fused, eager = summarize(result)["fused"], summarize(result)["eager"]
    assert 1e-5 < fused["loss_gap_mean"] < 0.02, result
    assert fused["loss_gap_mean"] <= 2 * eager["loss_gap_mean"] + 0.005, result
    assert fused["cosine_mean"] >= eager["cosine_mean"] - 0.05, result


def test_bf16_fused_path_is_chosen_only_where_the_kernels_take_it():
    _require("cpu")
    net = _net("fused")
    with torch.autocast("cpu", dtype=BF16):
        assert net.cells_path("cpu", torch.float32) == "fused"
    with torch.autocast("cpu", dtype=torch.float16):
        assert "float16 activations" in net.cells_path("cpu", torch.float32)
    double = copy.deepcopy(net).double()
    with torch.autocast("cpu", dtype=BF16):
        assert "torch.float64 weights with torch.bfloat16 activations" in double.cells_path("cpu", torch.float64)

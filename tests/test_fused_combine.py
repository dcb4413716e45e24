"""``bnao::combine``: a cell's output before its BN from all its states, reading only the loose ends.

Checked against the pure-PyTorch reference (one 1x1 convolution per loose state) and against the
training path's own formula (the stacked ReLU'd states through a 1x1 convolution with the columns of
the states that are not loose zeroed), with float64 ``gradcheck`` and ``opcheck``; the supernet's
evaluation through it is compared with the eager cells in tests/test_fused_supernet.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES

from bnao import extension
from bnao.ops.fused.combine import combine, combine_applies
from bnao.ops.fused.reference import combine_reference

LOOSE = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]  # a reduction cell's inputs 0 and nodes 1, 3, 4 left over


def _require(device: str) -> None:
    if not extension.has_kernel("combine", device):
        pytest.skip(f"bnao::combine is not built for {device}")


def _inputs(device, dtype=torch.float64, states=7, batch=3, channels=5, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    param = torch.float32 if dtype == torch.bfloat16 else dtype
    xs = [torch.randn(batch, channels, size, size, generator=generator).to(device=device, dtype=dtype)
          for _ in range(states)]
    weight = torch.randn(channels, states, channels, generator=generator).to(device=device, dtype=param)
    loose = torch.tensor(LOOSE[:states], device=device, dtype=param)
    return xs, weight, loose


def _stacked_convolution(xs, weight, loose):
    """The training path's formula: every state stacked, the columns of the non-loose ones zeroed."""
    columns = (weight * loose.view(1, -1, 1)).reshape(weight.shape[0], -1, 1, 1)
    return F.conv2d(F.relu(torch.stack(xs, 1).flatten(1, 2)), columns.to(xs[0].dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_combine_matches_the_reference_and_the_stacked_convolution(device):
    _require(device)
    # 5 and 11 channels: one partial tile of output channels, and a full one then a partial one.
    for (dtype, tolerance), channels in itertools.product(((torch.float64, 1e-12), (torch.float32, 1e-5)), (5, 11)):
        xs, weight, loose = _inputs(device, dtype, channels=channels)
        out = combine(xs, weight, loose)
        torch.testing.assert_close(out, combine_reference(xs, weight, loose), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(out, _stacked_convolution(xs, weight, loose), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_bf16_accumulates_in_float32(device):
    """bf16 states, float32 weight: the only rounding is the stored output's, checked against the float64
    reference on the same values."""
    _require(device)
    xs, weight, loose = _inputs(device, torch.bfloat16, channels=16)
    out = combine(xs, weight, loose)
    assert out.dtype == torch.bfloat16
    want = combine_reference([x.double() for x in xs], weight.double(), loose.double())
    rounded = want.to(torch.bfloat16)
    # Float32 sums round to the float64 result's bf16 neighbour, but for a sum within float32 error of a
    # rounding boundary: the same bits almost everywhere, one bf16 ulp (2^-7 of the leading power of two)
    # at most. Rounding the states' partial sums or the weight to bf16 would be off by many ulps.
    ulp = torch.exp2(torch.floor(torch.log2(rounded.double().abs().clamp_min(1e-30))) - 7)
    assert ((out.double() - rounded.double()).abs() <= ulp).all()
    assert (out == rounded).double().mean() >= 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_states_that_are_not_loose_are_not_read(device):
    """A NaN in a state that is not a loose end stays out (the stacked convolution would spread it: 0 * NaN),
    and a NaN in a loose one reaches the output, so a poisoned step is still seen."""
    _require(device)
    xs, weight, loose = _inputs(device)
    xs[1] = torch.full_like(xs[1], float("nan"))
    out = combine(xs, weight, loose)
    assert torch.isfinite(out).all()
    assert torch.isnan(_stacked_convolution(xs, weight, loose)).all()
    xs[0] = xs[0].clone()
    xs[0][0, 0, 0, 0] = float("nan")
    assert torch.isnan(combine(xs, weight, loose)[0, :, 0, 0]).all()
    none_loose = torch.zeros_like(loose)
    assert torch.equal(combine(xs, weight, none_loose), torch.zeros_like(xs[0]))


@pytest.mark.parametrize("device", DEVICES)
def test_combine_gradients(device):
    _require(device)
    xs, weight, loose = _inputs(device, batch=2, channels=3, size=3)
    xs = [x.requires_grad_() for x in xs]
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *states: combine(list(states), w, loose), (weight, *xs))
    # Against the stacked convolution's autograd: zero gradients for the states and columns not loose.
    grad = torch.randn_like(xs[0])
    got = torch.autograd.grad(combine(xs, weight, loose), [weight, *xs], grad)
    want = torch.autograd.grad(_stacked_convolution(xs, weight, loose), [weight, *xs], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not got[0][:, 1].any() and not got[2].any()


@pytest.mark.parametrize("device", DEVICES)
def test_combine_gradients_at_training_sizes(device):
    """Two channel tiles (11 = 8 + 3) and the weight gradient over one chunk of (n, p) pairs (3 x 11 x 11 = 363)
    and over two (2 x 64 x 64 = 8,192): against the stacked convolution's autograd, bit-identical when run
    twice (the tiles and the chunks are added in a fixed order)."""
    _require(device)
    cases = ((torch.float64, 1e-12, 3, 11), (torch.float32, 2e-5, 3, 11), (torch.float64, 1e-12, 2, 64))
    for dtype, tolerance, batch, size in cases:
        xs, weight, loose = _inputs(device, dtype, batch=batch, channels=11, size=size)
        xs = [x.requires_grad_() for x in xs]
        weight.requires_grad_()
        grad = torch.randn_like(xs[0])
        got = torch.autograd.grad(combine(xs, weight, loose), [weight, *xs], grad)
        want = torch.autograd.grad(_stacked_convolution(xs, weight, loose), [weight, *xs], grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance)
        again = torch.autograd.grad(combine(xs, weight, loose), [weight, *xs], grad)
        assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_combine_opcheck():
    _require("cpu")
    xs, weight, loose = _inputs("cpu", batch=2, channels=3, size=3)
    torch.library.opcheck(torch.ops.bnao.combine.default, ([x.clone().requires_grad_() for x in xs], weight, loose))
    # The backward has no double backward (the training path never differentiates it).
    torch.library.opcheck(torch.ops.bnao.combine_backward.default, (torch.randn_like(xs[0]), xs, weight, loose))


def test_combine_refuses_bad_arguments_with_the_fix():
    _require("cpu")
    xs, weight, loose = _inputs("cpu")
    with pytest.raises(RuntimeError, match=r"weight must be Double \[C, S, C\] = \[5, 7, 5\]"):
        torch.ops.bnao.combine(xs, weight[:, :6], loose)
    with pytest.raises(RuntimeError, match="loose must be Double"):
        torch.ops.bnao.combine(xs, weight, loose.float())
    with pytest.raises(RuntimeError, match="state 3 is"):
        torch.ops.bnao.combine(xs[:3] + [xs[3][:, :4]] + xs[4:], weight, loose)
    with pytest.raises(RuntimeError, match="pass 1 to 16 states"):
        torch.ops.bnao.combine([], weight, loose)


def test_the_fused_cell_takes_combine_where_compiled_and_the_dtypes_fit():
    xs, weight, loose = _inputs("cpu", dtype=torch.float32)
    built = extension.has_kernel("combine", "cpu")
    with torch.no_grad():
        assert combine_applies(xs, weight) == built
    assert combine_applies(xs, weight.requires_grad_()) == built  # training takes it too
    assert not combine_applies(xs[:-1] + [xs[-1].double()], weight)  # mixed dtypes (autocast) fall back
    assert not combine_applies(xs, weight.double())  # a weight not in the states' parameter dtype


def test_the_mask_takes_no_gradient():
    _require("cpu")
    xs, weight, loose = _inputs("cpu")
    with pytest.raises(RuntimeError, match="loose is a constant 0/1 mask"):
        combine(xs, weight.requires_grad_(), loose.requires_grad_())

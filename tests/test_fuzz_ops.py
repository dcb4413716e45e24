"""The compiled ops fed with hostile tensors: an error, never a crash, never an index outside the pool.

Wrong dtypes, shapes, strides and devices, non-finite, negative and huge values, forged alias tables
and absurd integer arguments go straight to ``torch.ops.bnao.*`` (and to the Python wrappers, which
fall back to the references). A crash would kill the test process; a read out of bounds is caught
by the C++ unit tests under AddressSanitizer (scripts/test.sh), and its visible symptom here, an
index outside the table, fails the property.
"""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bnao import extension
from bnao.ops import sampler as sampler_ops

pytestmark = pytest.mark.skipif(not extension.has_ops(), reason="the compiled core is not built")

SCALE = float(os.environ.get("BNAO_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=list(HealthCheck), database=None)

INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, -(2**63)]))
FLOATS = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1e308, -1e-300, 5e-324, float("inf"), float("nan")]))
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.complex64]
# Draw counts whose output cannot be allocated: the op must refuse, not overflow or hang.
HUGE_DRAWS = [2**45, 2**62, 2**63 - 1]


@st.composite
def hostile_tensors(draw, values):
    """Tensors of any dtype and rank (0-3), possibly non-contiguous, expanded or on the meta device."""
    shape = draw(st.lists(st.integers(0, 6), max_size=3))
    numbers = draw(st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    dtype = draw(st.sampled_from(DTYPES))
    tensor = torch.tensor(numbers, dtype=torch.float64 if values is FLOATS else torch.int64).reshape(shape)
    if dtype != tensor.dtype:
        tensor = tensor.to(dtype) if dtype != torch.bool else tensor != 0
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded", "meta"]))
    if layout == "transposed" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)
    elif layout == "strided" and tensor.dim() >= 1:
        tensor = torch.stack([tensor, tensor], -1).select(-1, 0)
    elif layout == "expanded" and tensor.dim() >= 1 and tensor.shape[0] == 1:
        tensor = tensor.expand(4, *tensor.shape[1:])
    elif layout == "meta":
        tensor = tensor.to("meta")
    return tensor


#: The exceptions by which an op refuses its arguments (anything else, or a crash, fails the property).
REFUSALS = (RuntimeError, ValueError, TypeError, IndexError, OverflowError, NotImplementedError)


def _returns_or_refuses(op, *args):
    """Runs an op; returns its output, or None when it refused with a Python exception."""
    try:
        return op(*args)
    except REFUSALS:
        return None


@FUZZ
@given(st.lists(INT64, min_size=1, max_size=40), st.integers(0, 3000), INT64, st.integers(0, 2**63 - 1))
def test_a_forged_alias_table_never_yields_an_index_outside_it(columns, num_draws, seed, offset):
    table = torch.tensor(columns, dtype=torch.int64)
    n = table.numel()
    for op in (torch.ops.bnao.alias_draw, sampler_ops.reference_alias_draw):
        out = _returns_or_refuses(op, table, num_draws, seed, offset)
        if out is not None:
            assert out.shape == (num_draws,) and out.dtype == torch.int64
            assert bool(((out >= 0) & (out < n)).all()), "an index outside the table"


# Usable weight vectors with exact zeros among them (half the draws): the draws are then checked.
VALID_WEIGHTS = (st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e6)), min_size=1, max_size=50)
                 .filter(lambda w: sum(w) > 0).map(lambda w: torch.tensor(w, dtype=torch.float64)))


# Draw counts: small ones, negative ones and ones whose output cannot be allocated. Not the 2^30 to 2^44
# in between: with a usable table such a count is a real request for gigabytes to terabytes of draws,
# which virtual memory may grant and the machine then cannot back.
DRAW_COUNTS = st.one_of(st.integers(0, 500), st.sampled_from(HUGE_DRAWS), st.integers(-(2**63), -1))


@FUZZ
@given(st.one_of(hostile_tensors(FLOATS), VALID_WEIGHTS), DRAW_COUNTS, INT64, INT64)
def test_alias_ops_refuse_hostile_weights_and_arguments(weights, num_draws, seed, offset):
    table = _returns_or_refuses(torch.ops.bnao.alias_table, weights)
    if table is None or table.device.type == "meta":
        event("alias: table refused")
        return
    # A table was built: the weights were a usable 1-D floating vector.
    w = weights.double()
    assert weights.dim() == 1 and weights.is_floating_point() and bool(torch.isfinite(w).all())
    assert bool((w >= 0).all()) and float(w.sum()) > 0
    out = _returns_or_refuses(torch.ops.bnao.alias_draw, table, num_draws, seed, offset)
    if out is not None:
        assert 0 <= num_draws < 2**45 and offset >= 0
        assert bool(((out >= 0) & (out < table.numel())).all())
        assert bool((w[out] > 0).all()), "a zero-weight item was drawn"
        event("alias: draws checked")


MODEL_SIZE_SMALL = st.one_of(st.integers(-3, 40), INT64)


@FUZZ
@given(hostile_tensors(INT64 | st.integers(-2, 6)), st.one_of(st.integers(0, 8), INT64),
       st.lists(MODEL_SIZE_SMALL, max_size=6), st.lists(MODEL_SIZE_SMALL, max_size=6),
       st.lists(MODEL_SIZE_SMALL, min_size=6, max_size=6))
def test_model_size_refuses_hostile_archs_and_settings(archs, num_nodes, kinds, kernels, settings_):
    skeleton, layers, channels, classes, in_channels, image_size = settings_
    out = _returns_or_refuses(torch.ops.bnao.model_size, archs, num_nodes, kinds, kernels, skeleton, layers,
                              channels, classes, in_channels, image_size)
    if out is None or out.device.type == "meta":
        return
    assert archs.dim() == 2 and archs.dtype == torch.int64 and archs.shape[1] == 8 * num_nodes
    assert out.shape == (archs.shape[0], 2) and bool((out >= 0).all())


def test_the_model_size_kernel_gives_real_sizes_on_a_valid_pool():
    """The property above must not pass by refusing everything: valid input gives the reference's sizes."""
    from bnao.size import model_size
    from bnao.space import NAOSpace

    space = NAOSpace()
    pool = space.sample_array(64, rng=0)
    assert np.array_equal(model_size(pool, space=space, layers=2, channels=8),
                          model_size(pool, space=space, layers=2, channels=8, backend="reference"))


SMALL = st.one_of(st.floats(-4, 4), st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), float("nan")]))


@st.composite
def combine_arguments(draw):
    """A third anything at all; a third states of one 4-D shape (empty dims included) with a weight and mask
    that may or may not fit them, in any dtype; a third valid arguments. Values finite half the time (a full
    comparison), else with infinities and NaN."""
    mode = draw(st.sampled_from(["hostile", "near", "valid"]))
    if mode == "hostile":
        return (draw(st.lists(hostile_tensors(FLOATS), max_size=18)), draw(hostile_tensors(FLOATS)),
                draw(hostile_tensors(FLOATS)))
    valid = mode == "valid"
    count = draw(st.integers(1 if valid else 0, 18))
    dim = st.integers(1, 3) if valid else st.sampled_from([1, 2, 3, 1, 2, 3, 0])  # mostly non-empty
    shape = (draw(dim), draw(dim), draw(dim), draw(dim))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16] + ([] if valid else [torch.float16])))

    def tensor(size, kind):
        numbers = draw(st.lists(kind, min_size=int(np.prod(size)), max_size=int(np.prod(size))))
        return torch.tensor(numbers, dtype=torch.float64).reshape(size)

    def mostly(right, *wrong):
        return right if valid else draw(st.sampled_from([right] * 3 + list(wrong)))

    finite = draw(st.booleans())
    values = st.floats(-4, 4) if finite else SMALL
    states = [tensor(shape, values).to(dtype) for _ in range(count)]
    param = mostly(torch.float64 if dtype == torch.float64 else torch.float32, torch.float16)
    weight = tensor(mostly((shape[1], count, shape[1]), (shape[1], count + 1, shape[1]), (count,)), values).to(param)
    loose = tensor((mostly(count, count + 1),), st.sampled_from([0.0, 1.0, 0.5] + ([] if finite else [float("nan")])))
    return states, weight, loose.to(mostly(param, torch.float16))


@FUZZ
@given(combine_arguments())
def test_combine_refuses_hostile_states_weights_and_masks(arguments):
    """bnao::combine with any states, weight and mask: a refusal, or the reference's result where the
    arguments are valid (where the reference is finite: non-finite values may sum in another order)."""
    from bnao.ops.fused.reference import combine_reference

    states, weight, loose = arguments
    out = _returns_or_refuses(torch.ops.bnao.combine, states, weight, loose)
    if out is None or out.device.type == "meta":
        event("combine: refused")
        return
    assert states[0].dim() == 4 and states[0].numel() > 0 and all(s.shape == states[0].shape for s in states)
    want = combine_reference([s.double() for s in states], weight.double(), loose.double())
    # Float sums of terms that may cancel: their error scales with the sum of the terms' magnitudes (the
    # reference on |x|, |W|, |loose|), not with the result; bf16 adds one rounding of the result (2^-8).
    magnitude = combine_reference([s.double().abs() for s in states], weight.double().abs(), loose.double().abs())
    scale = max(1.0, float(magnitude.nan_to_num(0, 0, 0).max()))
    atol = (2.0**-8 if out.dtype == torch.bfloat16 else 1e-5) * scale
    if all(torch.isfinite(t).all() for t in (*states, weight, loose)):
        event("combine: finite inputs, every element compared")
        torch.testing.assert_close(out.double(), want, rtol=0, atol=atol)
    else:
        event("combine: non-finite inputs, NaN positions and finite elements compared")
        finite = torch.isfinite(want)
        assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.equal(torch.isinf(out), torch.isinf(want))
        torch.testing.assert_close(out.double()[finite], want[finite], rtol=0, atol=atol)

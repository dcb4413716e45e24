"""Samplers and alias-method ops: distribution, reproducibility, state, C++ == reference."""

import io

import numpy as np
import pytest
import torch
from conftest import DEVICES
from scipy import stats

import bnao
from bnao import extension
from bnao.ops import sampler as ops
from bnao.sampling import ProportionalSampler, Sampler, UniformSampler, create_sampler, list_samplers

HAS_CPU_KERNELS = extension.has_kernel("alias_draw", "cpu")
needs_extension = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="bnao._C is not built")


def weight_shapes():
    """Named weight vectors covering the shapes a pool can have."""
    rng = np.random.default_rng(2024)
    some_zeros = rng.uniform(1.0, 10.0, 1000)
    some_zeros[rng.random(1000) < 0.3] = 0.0
    dominant = np.full(500, 1.0)
    dominant[123] = 5000.0
    return {
        "flat": np.full(1000, 3.0),
        "pareto": rng.pareto(1.1, 2000) + 1.0,  # heavy tail: max/median in the hundreds
        "dominant": dominant,
        "some_zeros": some_zeros,
        "model_sizes": rng.integers(100_000, 5_000_000, 3000).astype(np.float64),
        "n1": np.array([2.5]),
    }


WEIGHTS = weight_shapes()


def merged_chisquare(counts, probs, min_expected=20.0):
    """Chi-square p-value of counts against probs, pooling items so every bin expects >= min_expected.

    Items are pooled in order of increasing probability (tail items of a heavy
    tail expect only a few draws each, which breaks the chi-square approximation).
    """
    counts = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(probs, dtype=np.float64) * counts.sum()
    order = np.argsort(expected, kind="stable")
    obs_bins, exp_bins = [], []
    acc_obs = acc_exp = 0.0
    for i in order:
        acc_obs += counts[i]
        acc_exp += expected[i]
        if acc_exp >= min_expected:
            obs_bins.append(acc_obs)
            exp_bins.append(acc_exp)
            acc_obs = acc_exp = 0.0
    if acc_exp > 0 or acc_obs > 0:
        if exp_bins:
            obs_bins[-1] += acc_obs
            exp_bins[-1] += acc_exp
        else:
            obs_bins.append(acc_obs)
            exp_bins.append(acc_exp)
    if len(obs_bins) < 2:
        return 1.0  # a single bin: all mass in one place, nothing to test
    obs_bins, exp_bins = np.array(obs_bins), np.array(exp_bins)
    exp_bins *= obs_bins.sum() / exp_bins.sum()  # scipy requires equal totals to 1e-8
    return float(stats.chisquare(obs_bins, exp_bins).pvalue)


# ----------------------------------------------------------------------------- distribution
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", sorted(WEIGHTS))
def test_proportional_fits_target(shape, device):
    weights = WEIGHTS[shape]
    sampler = create_sampler("proportional", weights, seed=11, device=device)
    draws = sampler.draw(1_000_000)
    assert draws.device.type == device and draws.dtype == torch.int64
    counts = np.bincount(draws.cpu().numpy(), minlength=weights.size)
    assert counts.size == weights.size, "an index outside the pool was drawn"
    probs = weights / weights.sum()
    assert counts[probs == 0].sum() == 0, "a zero-weight item was drawn"
    assert merged_chisquare(counts, probs) > 1e-4
    np.testing.assert_allclose(sampler.probabilities().numpy(), probs, rtol=1e-12, atol=0)


def test_chisquare_detects_a_wrong_distribution():
    # The goodness-of-fit check above must be able to fail: pareto draws are
    # far from uniform and from a slightly perturbed target.
    weights = WEIGHTS["pareto"]
    counts = np.bincount(create_sampler("proportional", weights, seed=3).draw(1_000_000).numpy(), minlength=weights.size)
    assert merged_chisquare(counts, np.full(weights.size, 1.0 / weights.size)) < 1e-10
    perturbed = weights.copy()
    perturbed[np.argsort(weights)[-200:]] *= 1.05  # the heaviest 10% of items, 5% heavier
    assert merged_chisquare(counts, perturbed / perturbed.sum()) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_fits_and_ignores_values(device):
    weights = WEIGHTS["some_zeros"]
    sampler = create_sampler("uniform", weights, seed=5, device=device)
    counts = np.bincount(sampler.draw(500_000).cpu().numpy(), minlength=weights.size)
    assert merged_chisquare(counts, np.full(weights.size, 1.0 / weights.size)) > 1e-4
    assert counts.min() > 0, "uniform draws every item, zero weights included"
    assert create_sampler("uniform", 7).num_items == 7


@pytest.mark.parametrize("alpha,mix", [(2.0, 0.0), (0.5, 0.25), (0.0, 0.0), (1.0, 1.0)])
def test_alpha_and_uniform_mix(alpha, mix):
    weights = WEIGHTS["some_zeros"]
    sampler = create_sampler("proportional", weights, alpha=alpha, uniform_mix=mix, seed=9)
    powered = np.where(weights > 0, weights**alpha, 0.0)
    expected = (1 - mix) * powered / powered.sum() + mix / weights.size
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-12, atol=1e-15)
    counts = np.bincount(sampler.draw(500_000).numpy(), minlength=weights.size)
    assert merged_chisquare(counts, expected) > 1e-4
    if mix == 0.0:
        assert counts[weights == 0].sum() == 0


def test_table_reconstructs_target_to_2_pow_minus_32():
    for name, weights in WEIGHTS.items():
        sampler = create_sampler("proportional", weights)
        implied = ops.table_probabilities(sampler.table)
        # Each column loses < 2^-32 of its mass to the threshold floor; an item
        # receiving k donations is off by at most (k + 1) 2^-32 / n.
        _, aliases = ops.unpack_table(sampler.table)
        aliases = aliases.astype(np.int64)
        donating = aliases != np.arange(weights.size)
        donors = np.bincount(aliases[donating], minlength=weights.size)
        # + 1e-3 units: double rounding in the build, orders of magnitude below 2^-32.
        bound = (donors + 1 + 1e-3) / (2.0**32 * weights.size)
        err = np.abs(implied - weights / weights.sum())
        assert np.all(err <= bound), f"{name}: worst excess {np.max(err - bound)}"
        assert np.all(implied[weights == 0] == 0), name


# ----------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_sequence(device):
    weights = WEIGHTS["model_sizes"]
    a = create_sampler("proportional", weights, seed=1234, device=device).draw(50_000)
    b = create_sampler("proportional", weights, seed=1234, device=device).draw(50_000)
    c = create_sampler("proportional", weights, seed=1235, device=device).draw(50_000)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_draws_equal_one_big_draw(device):
    weights = WEIGHTS["pareto"]
    whole = create_sampler("proportional", weights, seed=77, device=device).draw(100_000)
    sampler = create_sampler("proportional", weights, seed=77, device=device)
    parts = [sampler.draw(k) for k in (1, 0, 9_999, 33_333, 56_667)]
    assert torch.equal(torch.cat(parts), whole)
    assert sampler.num_drawn == 100_000
    table = sampler.table
    by_offset = torch.cat([ops.alias_draw(table, 60_000, 77, 0), ops.alias_draw(table, 40_000, 77, 60_000)])
    assert torch.equal(by_offset, whole)


@pytest.mark.parametrize("device", DEVICES)
def test_single_draws_equal_batched_draws(device):
    weights = WEIGHTS["dominant"]
    whole = create_sampler("proportional", weights, seed=8, device=device).draw(60_000).tolist()
    sampler = create_sampler("proportional", weights, seed=8, device=device)
    got = [sampler.draw() for _ in range(20_001)]  # crosses buffer refills
    assert all(isinstance(x, int) for x in got[:10])
    got += sampler.draw(9_999).tolist()  # batched after singles continues the stream
    got += [sampler.draw() for _ in range(30_000)]
    assert got == whole
    assert sampler.num_drawn == 60_000


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_resume_continues_exactly(device):
    weights = WEIGHTS["model_sizes"]
    original = create_sampler("proportional", weights, alpha=0.7, uniform_mix=0.1, seed=42, device=device)
    for _ in range(1234):  # leaves a partly used buffer behind
        original.draw()
    original.draw(100)
    state = original.state_dict()
    assert state["num_drawn"] == 1334 and state["seed"] == 42
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    expected = [original.draw() for _ in range(10_000)] + original.draw(500).tolist()
    resumed = create_sampler("proportional", [1.0], seed=0, device=device)  # other pool, seed and options
    resumed.load_state_dict(state)
    assert (resumed.alpha, resumed.uniform_mix, resumed.seed, resumed.num_drawn) == (0.7, 0.1, 42, 1334)
    got = [resumed.draw() for _ in range(10_000)] + resumed.draw(500).tolist()
    assert got == expected


def test_load_state_dict_rejects_foreign_or_tampered_state():
    state = create_sampler("proportional", WEIGHTS["flat"], seed=1).state_dict()
    with pytest.raises(ValueError, match="'proportional'"):
        create_sampler("uniform", 3).load_state_dict(state)
    tampered = dict(state, table_sha256="0" * 64, options={"alpha": 2.0, "uniform_mix": 0.0})
    untouched = create_sampler("proportional", [1.0, 3.0], seed=5)
    untouched.draw(7)
    with pytest.raises(ValueError, match="differs"):
        untouched.load_state_dict(tampered)
    assert (untouched.num_items, untouched.alpha, untouched.seed, untouched.num_drawn) == (2, 1.0, 5, 7)
    with pytest.raises(ValueError, match="missing"):
        create_sampler("proportional", [1.0]).load_state_dict({"sampler": "proportional"})


def test_set_weights_keeps_stream_position():
    sampler = create_sampler("proportional", WEIGHTS["flat"], seed=21)
    for _ in range(100):
        sampler.draw()
    new_weights = WEIGHTS["pareto"]
    sampler.set_weights(new_weights)
    assert sampler.num_drawn == 100 and sampler.num_items == new_weights.size
    # The NumPy reference (the sampler runs the compiled kernels when they are built).
    expected = ops.reference_alias_draw(ops.reference_alias_table(torch.from_numpy(new_weights)), 5_000, 21, 100)
    assert [sampler.draw() for _ in range(5_000)] == expected.tolist()


# ----------------------------------------------------------------------------- C++ vs reference
def test_reference_philox_known_answers():
    # Random123 kat_vectors for philox4x32-10.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        words = ops.reference_philox4x32_10(tuple(np.array([c], dtype=np.uint64) for c in counter), key)
        assert tuple(int(w[0]) for w in words) == expected


@needs_extension
@pytest.mark.parametrize("shape", sorted(WEIGHTS))
def test_reference_matches_compiled_kernels(shape):
    weights = torch.from_numpy(WEIGHTS[shape])
    table = torch.ops.bnao.alias_table(weights)
    assert torch.equal(table, ops.reference_alias_table(weights))
    assert torch.equal(torch.ops.bnao.alias_table(weights.float()), ops.reference_alias_table(weights.float()))
    for seed, offset in [(0, 0), (2**64 - 1, 2**40 + 17), (-5, 3), (123456789, 2**32 - 100)]:
        compiled = torch.ops.bnao.alias_draw(table, 20_000, ops.to_signed_seed(seed), offset)
        assert torch.equal(compiled, ops.reference_alias_draw(table, 20_000, seed, offset)), (seed, offset)


@needs_extension
def test_reference_matches_compiled_on_rounding_edge_cases():
    # Sums that are not exact in binary, sub-normal-free tiny weights next to
    # huge ones, equal weights whose scaled value rounds below 1.
    rng = np.random.default_rng(7)
    cases = [
        np.full(3, 0.1),
        np.full(7, 1.0 / 3.0),
        np.array([1e-300, 1.0, 1e300]),
        rng.random(10_000) ** 8,
        np.concatenate([np.zeros(50), rng.exponential(size=50)]),
    ]
    for w in cases:
        weights = torch.from_numpy(w)
        assert torch.equal(torch.ops.bnao.alias_table(weights), ops.reference_alias_table(weights))


@needs_extension
def test_dispatch_falls_back_to_reference(monkeypatch):
    """Without a kernel for the device, the ops and the sampler run the NumPy reference: same table, same draws
    as the compiled kernels (called here directly, not through the dispatch under test)."""
    weights = torch.from_numpy(WEIGHTS["some_zeros"])
    expected_table = torch.ops.bnao.alias_table(weights)
    expected_draws = torch.ops.bnao.alias_draw(expected_table, 1000, 3, 10)
    ran = []
    for name in ("reference_alias_table", "reference_alias_draw"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name: ran.append(_n) or _f(*a))
    assert torch.equal(ops.alias_table(weights), expected_table)  # compiled: the reference must not run
    assert ran == [], "with the kernels built, the dispatch ran the reference"
    monkeypatch.setattr(extension, "has_kernel", lambda op, device="cpu": False)
    assert torch.equal(ops.alias_table(weights), expected_table)
    assert torch.equal(ops.alias_draw(expected_table, 1000, 3, 10), expected_draws)
    assert ran == ["reference_alias_table", "reference_alias_draw"]
    sampler = create_sampler("proportional", weights, seed=3)
    sampler.draw(10)
    assert sampler.draw(1000).tolist() == expected_draws.tolist()
    assert set(ran[2:]) == {"reference_alias_table", "reference_alias_draw"}


# Weights {1, 0, 2, 7}: the table built by hand in csrc/tests/test_alias.cpp (scale 0.4; columns 0, 1, 2
# keep floor(0.4 * 2^32), 0 and floor(0.8 * 2^32) and alias 3; column 3 aliases itself), and draws
# 1000..1015 of stream 42 derived by hand from the Philox words (n = 4: column = top two bits of r1).
HAND_WEIGHTS = [1.0, 0.0, 2.0, 7.0]
HAND_THRESHOLDS = [1717986918, 0, 3435973836, 0xFFFFFFFF]
HAND_ALIASES = [3, 3, 3, 3]
HAND_DRAWS_42_FROM_1000 = [2, 3, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 3, 2, 2]


@pytest.mark.parametrize("impl", ["reference", pytest.param("compiled", marks=needs_extension)])
def test_table_and_draws_match_hand_derivation(impl):
    """The NumPy reference and the compiled kernels against a table and draws worked out by hand."""
    if impl == "reference":
        table_of, draw = ops.reference_alias_table, ops.reference_alias_draw
    else:
        table_of = torch.ops.bnao.alias_table
        draw = lambda t, n, seed, offset: torch.ops.bnao.alias_draw(t, n, ops.to_signed_seed(seed), offset)  # noqa: E731
    table = table_of(torch.tensor(HAND_WEIGHTS, dtype=torch.float64))
    thresholds, aliases = ops.unpack_table(table)
    assert thresholds.tolist() == HAND_THRESHOLDS and aliases.tolist() == HAND_ALIASES
    assert draw(table, 16, 42, 1000).tolist() == HAND_DRAWS_42_FROM_1000
    # The draw rule written out with Python integers, over many draws: column = hi64(((r1 << 32) | r0) * n),
    # kept when r2 < threshold, else the alias. The Philox words come from the reference Philox, which is
    # checked against the Random123 known answers above.
    offset, count = 2**32 - 500, 2000  # the counter's high word changes inside the range
    c = np.arange(count, dtype=np.uint64) + np.uint64(offset)
    zeros = np.zeros(count, dtype=np.uint64)
    r0, r1, r2, _ = ops.reference_philox4x32_10((c & np.uint64(0xFFFFFFFF), c >> np.uint64(32), zeros, zeros),
                                                (42, 0))
    expected = []
    for w0, w1, w2 in zip(r0.tolist(), r1.tolist(), r2.tolist()):
        column = (((w1 << 32) | w0) * 4) >> 64
        expected.append(column if w2 < HAND_THRESHOLDS[column] else HAND_ALIASES[column])
    assert draw(table, count, 42, offset).tolist() == expected


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    weights = torch.from_numpy(WEIGHTS["pareto"]).to(device)
    torch.library.opcheck(torch.ops.bnao.alias_table.default, (weights,))
    torch.library.opcheck(torch.ops.bnao.alias_table.default, (weights.float(),))
    table = torch.ops.bnao.alias_table(weights)
    torch.library.opcheck(torch.ops.bnao.alias_draw.default, (table, 1000, 7, 3))
    torch.library.opcheck(torch.ops.bnao.alias_draw.default, (table, 0, -1, 0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_cuda_agree_exactly():
    assert extension.has_kernel("alias_draw", "cuda"), "bnao._C was built without CUDA kernels"
    for shape, weights in WEIGHTS.items():
        w = torch.from_numpy(weights)
        cpu_table = torch.ops.bnao.alias_table(w)
        cuda_table = torch.ops.bnao.alias_table(w.cuda())
        assert cuda_table.is_cuda and torch.equal(cuda_table.cpu(), cpu_table), shape
        for seed, offset, count in [(0, 0, 1), (99, 5, 1_000_003), (2**64 - 3, 2**41, 70_000)]:
            cpu = ops.alias_draw(cpu_table, count, seed, offset)
            cuda = ops.alias_draw(cuda_table, count, seed, offset)
            assert torch.equal(cuda.cpu(), cpu), (shape, seed, offset)


# ----------------------------------------------------------------------------- errors and registry
@pytest.mark.parametrize(
    "weights,match",
    [
        ([], "empty"),
        ([1.0, -2.0], "negative"),
        ([1.0, float("nan")], "finite"),
        ([float("inf"), 1.0], "finite"),
        ([0.0, 0.0, 0.0], "all weights are zero"),
        ([[1.0, 2.0], [3.0, 4.0]], "1-D"),
        (torch.tensor(3.0), "1-D"),
        (["a", "b"], "numbers"),
        ([True, False], "real numbers"),
        ([1e308, 1e308], "infinity"),
    ],
)
@pytest.mark.parametrize("name", ["proportional", "uniform"])
def test_bad_weights_raise_value_error(name, weights, match):
    with pytest.raises(ValueError, match=match):
        create_sampler(name, weights)


@needs_extension
def test_kernels_reject_bad_input_with_clear_messages():
    with pytest.raises(RuntimeError, match="negative"):
        torch.ops.bnao.alias_table(torch.tensor([1.0, -1.0]))
    with pytest.raises(RuntimeError, match="all weights are zero"):
        torch.ops.bnao.alias_table(torch.zeros(4))
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.bnao.alias_table(torch.ones(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="1-D"):
        torch.ops.bnao.alias_table(torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="offset"):
        torch.ops.bnao.alias_draw(torch.ops.bnao.alias_table(torch.ones(3)), 5, 0, -1)


def test_bad_options_and_arguments():
    with pytest.raises(ValueError, match="alpha"):
        create_sampler("proportional", [1.0, 2.0], alpha=-1.0)
    with pytest.raises(ValueError, match="uniform_mix"):
        create_sampler("proportional", [1.0, 2.0], uniform_mix=1.5)
    with pytest.raises(ValueError, match="no effect"):
        create_sampler("uniform", [1.0, 2.0], alpha=2.0)
    with pytest.raises(ValueError, match="seed"):
        create_sampler("proportional", [1.0, 2.0], seed=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        create_sampler("proportional", [1.0, 2.0]).draw(-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            create_sampler("proportional", [1.0, 2.0], device="cuda")
    with pytest.raises(KeyError, match="proportional"):
        create_sampler("proportionl", [1.0])


def test_registry_and_lazy_exports():
    assert {"uniform", "proportional"} <= set(list_samplers())
    assert bnao.create_sampler is create_sampler and "uniform" in bnao.list_samplers()
    assert isinstance(create_sampler("uniform", 4), UniformSampler)
    assert isinstance(create_sampler("proportional", [1, 2]), ProportionalSampler)

    class EveryOther(Sampler):
        name = "test_every_other"

        def __init__(self, weights, *, alpha=1.0, uniform_mix=0.0, seed=0, device="cpu"):
            super().__init__(weights, seed=seed, device=device)

        def _target_weights(self, weights):
            target = torch.zeros_like(weights)
            target[::2] = 1.0
            return target

    bnao.register_sampler("test_every_other", EveryOther)
    draws = create_sampler("test_every_other", np.ones(10), seed=1).draw(10_000)
    assert set(draws.tolist()) == {0, 2, 4, 6, 8}
    with pytest.raises(ValueError, match="already registered"):
        bnao.register_sampler("test_every_other", EveryOther)

"""Search space: validation, string/JSON forms, tokens, canonical hash, sampling, mutation."""

import json

import numpy as np
import pytest

from bnao import create_search_space, list_search_spaces
from bnao.space import Arch, InvalidArchError, NAOSpace

SPACES = [NAOSpace(5, "small"), NAOSpace(5, "middle"), NAOSpace(3, "small")]


def swap_node(values, cell, node):
    values = list(values)
    base = cell * len(values) // 2 + 4 * node
    values[base : base + 4] = values[base + 2 : base + 4] + values[base : base + 2]
    return values


def test_registry():
    assert "nao" in list_search_spaces()
    space = create_search_space("nao", op_set="middle")
    assert space.num_ops == 10 and space.length == 40
    with pytest.raises(KeyError, match="did you mean 'nao'"):
        create_search_space("nai")


@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_samples_are_valid_and_cover_the_bounds(space):
    archs = space.sample_array(5000, rng=0)
    assert archs.shape == (5000, space.length)
    assert not space.invalid_rows(archs).any()
    # Every position reaches its full range, so the sampler is not biased to a sub-space.
    assert (archs.max(axis=0) == space.bounds - 1).all()
    assert (archs.min(axis=0) == 0).all()


def test_string_and_json_round_trip():
    space = NAOSpace()
    arch = space.sample(rng=3)
    text = str(arch)
    assert len(text.split()) == 40
    assert space.parse(text) == arch
    assert space.parse(arch.to_json()) == arch
    assert space.parse(json.dumps(arch.to_list())) == arch
    assert space.arch(arch.to_array()) == arch
    assert space.arch({"normal": list(arch.normal), "reduction": list(arch.reduction)}) == arch
    assert isinstance(space.arch(text), Arch)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda v: v[:-1], "has 40 integers"),
        (lambda v: v[:0] + [2] + v[1:], r"normal cell, node 2 \(position 0\), x_id: input id 2 is not an earlier state"),
        (lambda v: v[:21] + [5] + v[22:], r"reduction cell, node 2 \(position 21\), x_op: op 5 is out of range"),
        (lambda v: v[:18] + [-1] + v[19:], r"normal cell, node 6 \(position 18\), y_id"),
        (lambda v: v[:5] + [1.5] + v[6:], "is not an integer"),
    ],
)
def test_invalid_archs_name_cell_node_and_position(mutate, message):
    space = NAOSpace()
    values = space.sample(rng=1).to_list()
    with pytest.raises(InvalidArchError, match=message):
        space.arch(mutate(values))


def test_parse_errors():
    space = NAOSpace()
    with pytest.raises(InvalidArchError, match="'x' is not an integer"):
        space.parse("0 x " + "0 0 " * 19)
    with pytest.raises(InvalidArchError, match="not valid JSON"):
        space.parse("[0, 1,")
    with pytest.raises(InvalidArchError, match="exactly the keys"):
        space.arch({"normal": [0] * 20})


def test_validate_array_names_the_row():
    space = NAOSpace()
    archs = space.sample_array(10, rng=0)
    archs[7, 3] = 99
    with pytest.raises(InvalidArchError, match="arch 7: normal cell, node 2"):
        space.validate_array(archs)
    with pytest.raises(InvalidArchError, match="must be integers"):
        space.validate_array(archs.astype(float))


@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_tokens_round_trip_and_ranges(space):
    archs = space.sample_array(200, rng=5)
    tokens = space.encode(archs)
    np.testing.assert_array_equal(space.decode(tokens), archs)
    low, high = space.token_bounds()
    assert (tokens >= low).all() and (tokens < high).all()
    assert tokens.min() >= 1 and tokens.max() < space.vocab_size
    assert space.vocab_size == 1 + (space.num_nodes + 1) + space.num_ops


def test_token_values_follow_the_spec():
    space = NAOSpace(5, "small")
    arch = [0, 1, 1, 4] * 5 + [0, 0, 1, 2] * 5
    tokens = space.encode(arch)
    # ids +1, ops +1+(B+1) with B=5.
    assert tokens[:4].tolist() == [1, 8, 2, 11]
    assert tokens[20:24].tolist() == [1, 7, 2, 9]


@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_canonical_hash_ignores_branch_swaps(space):
    rng = np.random.default_rng(0)
    archs = space.sample_array(300, rng=rng)
    hashes = space.hash_array(archs)
    for row, h in zip(archs, hashes):
        cell, node = rng.integers(2), rng.integers(space.num_nodes)
        swapped = swap_node(row.tolist(), cell, node)
        assert space.hash_array(np.asarray(swapped)) == h
    # Distinct archs (after canonicalisation) get distinct hashes.
    canon = {tuple(r) for r in space.canonical_array(archs)}
    assert len(set(hashes.tolist())) == len(canon)


def test_hash_distinguishes_different_archs():
    space = NAOSpace()
    arch = space.sample(rng=2)
    other = space.mutate(arch, rng=0)
    assert other != arch
    assert space.hash(arch) != space.hash(other)
    assert len(space.hash(arch)) == 16


def test_mutation_changes_exactly_the_requested_positions():
    space = NAOSpace()
    rng = np.random.default_rng(4)
    for _ in range(100):
        arch = space.sample(rng)
        k = int(rng.integers(1, 4))
        child = space.mutate(arch, rng, num_changes=k)
        assert int((child.to_array() != arch.to_array()).sum()) == k


def test_sampling_is_seeded():
    space = NAOSpace()
    np.testing.assert_array_equal(space.sample_array(10, rng=7), space.sample_array(10, rng=7))
    assert not np.array_equal(space.sample_array(10, rng=7), space.sample_array(10, rng=8))

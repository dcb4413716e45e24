"""Pareto fronts (score up, size down) against a brute-force dominance check."""

import json

import numpy as np
import pytest

from bnao.search.pareto import front_records, pareto_front, plot_front, pool_fronts, write_run_fronts
from bnao.search.pool import Pool
from bnao.space import NAOSpace


def brute_force_front(scores, sizes):
    """Indices i such that no j has score_j >= score_i and size_j <= size_i with one strict (NaN scores out)."""
    keep = []
    for i in range(len(scores)):
        if np.isnan(scores[i]):
            continue
        dominated = any(
            not np.isnan(scores[j]) and scores[j] >= scores[i] and sizes[j] <= sizes[i]
            and (scores[j] > scores[i] or sizes[j] < sizes[i])
            for j in range(len(scores)))
        if not dominated:
            keep.append(i)
    return set(keep)


def test_hand_example():
    # (size, score): a=(1, .5) b=(2, .5) dominated by a, c=(2, .7), d=(3, .6) dominated by c, e=(4, .9), f=(4, .9)
    sizes = [1, 2, 2, 3, 4, 4]
    scores = [0.5, 0.5, 0.7, 0.6, 0.9, 0.9]
    assert pareto_front(scores, sizes).tolist() == [0, 2, 4, 5]


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_with_ties_and_nans(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    # Few distinct values so that equal sizes and equal scores are common.
    sizes = rng.integers(0, 8, n).astype(float)
    scores = rng.integers(0, 6, n) / 5.0
    scores[rng.random(n) < 0.1] = np.nan
    front = pareto_front(scores, sizes)
    assert set(front.tolist()) == brute_force_front(scores, sizes)
    assert np.all(np.diff(sizes[front]) >= 0)  # smallest size first
    # Along the front a larger size always buys a strictly better score.
    distinct = sorted({(sizes[i], scores[i]) for i in front})
    assert all(b[1] > a[1] and b[0] > a[0] for a, b in zip(distinct, distinct[1:]))


def test_edge_cases():
    assert pareto_front([], []).tolist() == []
    assert pareto_front([np.nan, np.nan], [1, 2]).tolist() == []
    assert pareto_front([0.3], [5]).tolist() == [0]
    with pytest.raises(ValueError, match="3 scores but 2 sizes"):
        pareto_front([1, 2, 3], [1, 2])


def _pool_with_scores(rng, space, n0=30, n1=10):
    pool = Pool.empty(space)
    archs = space.sample_array(n0 + n1, rng=rng)
    pool.add(archs[:n0], np.arange(n0) + 1, iteration=0)
    pool.set_scores(0, rng.random(n0).round(2))
    pool.add(archs[n0:], np.arange(n1) + 1, iteration=1)
    pool.set_scores(1, rng.random(len(pool)).round(2))
    return pool


def test_pool_fronts_per_iteration():
    rng = np.random.default_rng(0)
    space = NAOSpace()
    pool = _pool_with_scores(rng, space)
    sizes = rng.integers(100, 140, len(pool))
    records = pool_fronts(pool, sizes, "params")
    for it in (0, 1):
        scores = pool.scores[it]
        mine = [r for r in records if r["iteration"] == it]
        expected = brute_force_front(scores, sizes[: scores.size])
        hashes = {f"{int(pool.hashes[i]):016x}" for i in expected}
        assert {r["hash"] for r in mine} == hashes
        assert all(r["stage"] == "one_shot" and r["measure"] == "params" for r in mine)
    one = front_records("standalone", ["a", "b"], ["h1", "h2"], [0.9, 0.8], [10, 20], "madds")
    assert one == [{"stage": "standalone", "arch": "a", "hash": "h1", "size": 10, "measure": "madds", "score": 0.9}]


class _FixedBudget:
    """Stands in for a Budget: sizes = 1000 + 10 * (first op of the arch) (a hand-checkable size)."""

    measure, active = "params", True

    def sizes(self, archs):
        archs = np.asarray(archs, dtype=np.int64).reshape(-1, 40)
        params = 1000 + 10 * archs[:, 1]
        return np.stack([params, params * 100], axis=1)

    def bounds(self, measure):
        return (None, 1030.0)

    def describe(self):
        return "params <= 1.03k"


def test_run_fronts_file_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    pool = _pool_with_scores(rng, NAOSpace())
    budget = _FixedBudget()
    ranking = [{"arch": " ".join(map(str, pool.archs[i].tolist())), "hash": f"{int(pool.hashes[i]):016x}",
                "standalone_accuracy": acc} for i, acc in ((0, 0.7), (1, 0.8), (2, 0.6))]
    (tmp_path / "ranking.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranking))
    assert write_run_fronts(tmp_path, pool, budget) is None  # the ranking is read back from the run directory
    records = [json.loads(line) for line in (tmp_path / "pareto.jsonl").read_text().splitlines()]
    sizes = budget.sizes(pool.archs)[:, 0]
    standalone = [r for r in records if r["stage"] == "standalone"]
    expected = brute_force_front([0.7, 0.8, 0.6], sizes[:3])
    assert {r["hash"] for r in standalone} == {ranking[i]["hash"] for i in expected}
    assert all(r["size"] == 1000 + 10 * int(r["arch"].split()[1]) for r in records)
    assert {r["iteration"] for r in records if r["stage"] == "one_shot"} == {0, 1}
    assert (tmp_path / "plots" / "pareto.png").stat().st_size > 1000
    assert plot_front(tmp_path / "empty.png", np.zeros(0), np.zeros(0), "madds") is None

"""Ranking metrics: hand cases (ties included), a brute-force reference, scipy, bad input."""

import numpy as np
import pytest
import scipy.stats

from bnao import metrics
from bnao.metrics import kendall_tau, pairwise_accuracy, spearman_rho


def brute_pairwise_accuracy(a, b):
    """The SPEC / NAO definition written as the plain double loop."""
    n = len(a)
    count = total = 0
    for i in range(n):
        for j in range(i + 1, n):
            if (a[i] >= a[j] and b[i] >= b[j]) or (a[i] < a[j] and b[i] < b[j]):
                count += 1
            total += 1
    return count / total


def test_pairwise_accuracy_hand_cases():
    assert pairwise_accuracy([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert pairwise_accuracy([1, 2, 3, 4], [40, 30, 20, 10]) == 0.0
    # One swapped pair out of 3.
    assert pairwise_accuracy([1, 2, 3], [1, 3, 2]) == pytest.approx(2 / 3)


def test_pairwise_accuracy_ties():
    # A tie in a agrees when b agrees (b[i] > b[j] reads as the same ">=" order) or ties.
    assert pairwise_accuracy([5, 5], [2, 1]) == 1.0
    assert pairwise_accuracy([5, 5], [1, 1]) == 1.0
    assert pairwise_accuracy([5, 5], [1, 2]) == 0.0
    # a[i] > a[j] with a tie in b agrees; a[i] < a[j] with a tie in b does not.
    assert pairwise_accuracy([2, 1], [7, 7]) == 1.0
    assert pairwise_accuracy([1, 2], [7, 7]) == 0.0
    # Mixed: pairs (0,1) tie in a, b ties -> agree; (0,2) 1<3, 4<9 -> agree; (1,2) 1<3, 4<9 -> agree.
    assert pairwise_accuracy([1, 1, 3], [4, 4, 9]) == 1.0
    # (0,1): a tie, b 4<5 -> disagree; (0,2) agree; (1,2) agree.
    assert pairwise_accuracy([1, 1, 3], [4, 5, 9]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("n", [2, 3, 17, 120])
def test_pairwise_accuracy_matches_brute_force(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        # Few distinct values so that ties in a, in b and in both all occur.
        a = rng.integers(0, 5, n).astype(float)
        b = rng.integers(0, 5, n).astype(float)
        assert pairwise_accuracy(a, b) == pytest.approx(brute_pairwise_accuracy(a, b), abs=1e-12)
        a = rng.random(n)
        b = a + 0.3 * rng.random(n)
        assert pairwise_accuracy(a, b) == pytest.approx(brute_pairwise_accuracy(a, b), abs=1e-12)


def test_blocking_gives_the_same_counts(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 7, 301).astype(float)
    b = a + rng.integers(-2, 3, 301)
    whole = (pairwise_accuracy(a, b), kendall_tau(a, b))
    monkeypatch.setattr(metrics, "_BLOCK_ELEMS", 1000)  # ~3 rows per block, many blocks
    assert (pairwise_accuracy(a, b), kendall_tau(a, b)) == pytest.approx(whole, abs=1e-12)
    assert whole[0] == pytest.approx(brute_pairwise_accuracy(a, b), abs=1e-12)


@pytest.mark.parametrize("n", [2, 5, 50, 1000])
def test_kendall_and_spearman_match_scipy(n):
    rng = np.random.default_rng(100 + n)
    cases = [
        (rng.random(n), rng.random(n)),
        (rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)),  # heavy ties
    ]
    x = rng.random(n)
    cases.append((x, x ** 3 + 0.05 * rng.random(n)))
    for a, b in cases:
        expected_tau = scipy.stats.kendalltau(a, b).statistic
        expected_rho = scipy.stats.spearmanr(a, b).statistic
        if np.isnan(expected_tau):
            assert np.isnan(kendall_tau(a, b))
        else:
            assert kendall_tau(a, b) == pytest.approx(expected_tau, abs=1e-12)
        if np.isnan(expected_rho):
            assert np.isnan(spearman_rho(a, b))
        else:
            assert spearman_rho(a, b) == pytest.approx(expected_rho, abs=1e-12)


def test_kendall_spearman_hand_cases():
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman_rho([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    assert spearman_rho([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    # A constant list has no ranking: undefined, as in scipy.
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert np.isnan(spearman_rho([1, 2, 3], [4, 4, 4]))


@pytest.mark.parametrize("fn", [pairwise_accuracy, kendall_tau, spearman_rho])
def test_bad_input(fn):
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        fn([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 items"):
        fn([1], [1])
    with pytest.raises(ValueError, match="finite"):
        fn([1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="1-D"):
        fn([[1, 2]], [[1, 2]])

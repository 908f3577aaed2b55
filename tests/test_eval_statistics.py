"""Bootstrap intervals and paired tests: hand-computed cases, and scipy's implementations where it has the test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from langmerge.errors import LangmergeError
from langmerge.evaluation import statistics as st


def test_mcnemar_exact_by_hand_and_against_scipy():
    # b = 1, c = 5: P(X <= 1) for X ~ Bin(6, 1/2) is 7/64; two-sided 14/64.
    assert st.mcnemar_exact(1, 5) == pytest.approx(14 / 64, abs=1e-15)
    assert st.mcnemar_exact(0, 0) == 1.0 and st.mcnemar_exact(4, 4) == 1.0
    for b, c in [(3, 10), (0, 5), (20, 35), (1, 0), (12, 2), (150, 110)]:
        assert st.mcnemar_exact(b, c) == pytest.approx(scipy.stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def test_sign_flip_on_one_task_is_mcnemar():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    a[:40], b[:40] = 1, 0  # a is better on some examples
    result = st.sign_flip_test([a], [b])
    wins, losses = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert result.discordant == wins + losses
    assert result.p_value == pytest.approx(scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-9)
    assert result.difference == pytest.approx((a.sum() - b.sum()) / 300)


def test_sign_flip_by_hand_on_two_tasks():
    # Task 1 (2 examples): a wins once; task 2 (1 example): a loses once. Weights 1/4 and 1/2:
    # T = (e1 - e2 * 2) / 4 with e1, e2 fair signs; observed (1 - 2) / 4 = -1/4.
    # Null values of 4T: 1-2=-1, 1+2=3, -1-2=-3, -1+2=1, each 1/4; |4T| >= 1 always: p = 1.
    result = st.sign_flip_test([[1, 0], [0]], [[0, 0], [1]])
    assert result.difference == pytest.approx(-0.25)
    assert result.p_value == pytest.approx(1.0)
    # Three wins of three in one task and one of one in another: only the observed signs and their
    # mirror image are as extreme: p = 2 / 16.
    result = st.sign_flip_test([[1, 1, 1], [1]], [[0, 0, 0], [0]])
    assert result.p_value == pytest.approx(2 / 16)


def test_sign_flip_matches_scipy_exact_permutation_test():
    rng = np.random.default_rng(7)
    for _ in range(5):
        n1, n2 = 9, 6
        a1, b1, a2, b2 = rng.integers(0, 2, n1), rng.integers(0, 2, n1), rng.integers(0, 2, n2), rng.integers(0, 2, n2)
        x = np.concatenate([a1, a2]).astype(float)
        y = np.concatenate([b1, b2]).astype(float)
        w = np.concatenate([np.full(n1, 1 / n1), np.full(n2, 1 / n2)]) / 2

        def statistic(x, y, axis=-1, w=w):  # this draw's weights
            return np.sum(w * (x - y), axis=axis)

        if statistic(x, y) == 0:
            continue
        exact = scipy.stats.permutation_test(
            (x, y), statistic, permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
        )
        ours = st.sign_flip_test([a1, a2], [b1, b2])
        assert ours.difference == pytest.approx(statistic(x, y))
        assert ours.p_value == pytest.approx(exact.pvalue, rel=1e-9)


def test_sign_flip_null_distribution_by_enumeration():
    weights, discordant = [3, 2, 5], [2, 3, 1]
    dist, offset = st.sign_flip_null(weights, discordant)
    counts: dict[int, int] = {}
    flips = [w for w, m in zip(weights, discordant) for _ in range(m)]
    for signs in itertools.product((-1, 1), repeat=len(flips)):
        t = sum(s * w for s, w in zip(signs, flips))
        counts[t] = counts.get(t, 0) + 1
    total = 2 ** len(flips)
    for t, c in counts.items():
        assert dist[t + offset] == pytest.approx(c / total, abs=1e-15)
    assert dist.sum() == pytest.approx(1.0)


def test_sign_flip_refuses_non_binary_outcomes_and_mismatched_examples():
    with pytest.raises(LangmergeError, match="0 or 1"):
        st.sign_flip_test([[0.5, 1]], [[0, 1]])
    with pytest.raises(LangmergeError, match="same examples"):
        st.sign_flip_test([[0, 1, 1]], [[0, 1]])


def test_bootstrap_ci_matches_scipy_percentile_interval():
    rng = np.random.default_rng(11)
    values = rng.integers(0, 2, 320).astype(float)
    ours = st.bootstrap_ci([values], resamples=40_000)
    theirs = scipy.stats.bootstrap(
        (values,), np.mean, method="percentile", n_resamples=40_000, random_state=np.random.default_rng(0)
    ).confidence_interval
    # Different random draws: the two Monte Carlo intervals agree to well within one example (1/320).
    assert ours[0] == pytest.approx(theirs.low, abs=0.004)
    assert ours[1] == pytest.approx(theirs.high, abs=0.004)
    # And both are near the normal approximation p +- 1.96 sqrt(p(1-p)/n).
    p = values.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(values))
    assert ours == pytest.approx((p - half, p + half), abs=0.006)


def test_bootstrap_by_hand():
    # A constant task has no spread; the interval of a grouped mean keeps each task's weight.
    assert st.bootstrap_ci([[1, 1, 1]]) == (1.0, 1.0)
    assert st.grouped_mean([[1, 1, 1, 1], [0, 0]]) == 0.5
    assert st.bootstrap_ci([[1, 1, 1, 1], [0, 0]]) == (0.5, 0.5)
    # The same seed gives the same interval; another seed a slightly different one.
    g = [[0, 1, 1, 0, 1, 1, 1, 0]]
    assert st.bootstrap_ci(g, seed=0) == st.bootstrap_ci(g, seed=0)


def test_ratio_bootstrap_by_hand():
    # Equal ratios in every item: the interval is that ratio exactly.
    assert st.bootstrap_ratio_ci([2.0, 4.0, 6.0], [1, 2, 3]) == pytest.approx((2.0, 2.0))
    low, high = st.bootstrap_ratio_ci([1.0, 3.0], [1, 1], resamples=20_000)
    assert low == pytest.approx(1.0) and high == pytest.approx(3.0)


def test_paired_bootstrap_against_scipy_and_by_hand():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 2, 400).astype(float)
    b = np.where(rng.random(400) < 0.8, a, 1 - a)
    ours = st.paired_bootstrap([a], [b], resamples=40_000)
    theirs = scipy.stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: np.mean(x - y, axis=axis),
        paired=True,
        method="percentile",
        n_resamples=40_000,
        random_state=np.random.default_rng(1),
    ).confidence_interval
    assert ours.difference == pytest.approx((a - b).mean())
    assert ours.ci[0] == pytest.approx(theirs.low, abs=0.004) and ours.ci[1] == pytest.approx(theirs.high, abs=0.004)
    # Identical models: difference 0, p = 1. A clear win: a tiny p-value (bounded below by 1 / (B + 1)).
    same = st.paired_bootstrap([a], [a])
    assert same.difference == 0 and same.p_value == 1.0
    win = st.paired_bootstrap([np.ones(200)], [np.r_[np.ones(100), np.zeros(100)]], resamples=1000)
    assert win.p_value == pytest.approx(1 / 1001) and win.difference == pytest.approx(0.5)
    # One-sample form: the mean of given per-example values.
    one = st.paired_bootstrap([[0.5, -0.5, 1.0, 0.0]])
    assert one.difference == pytest.approx(0.25)


def test_verdicts():
    up = st.PairedResult(0.1, (0.02, 0.18), 0.01, "t", 100)
    down = st.PairedResult(-0.1, (-0.18, -0.02), 0.01, "t", 100)
    unsure = st.PairedResult(0.1, (-0.02, 0.22), 0.2, "t", 100)
    assert [st.verdict(r) for r in (up, down, unsure)] == ["reproduced", "contradicted", "inconclusive"]

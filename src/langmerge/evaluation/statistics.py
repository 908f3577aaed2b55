"""Confidence intervals and paired tests for scores that are means over tasks of per-example outcomes.

A *score* here is the mean over tasks of each task's mean per-example outcome (accuracy or exact
match: 1 for a right answer, 0 for a wrong one). Its examples come in groups, one per task; every
resampling below keeps the groups (a stratified bootstrap), so each task weighs in the score as it
does in the point estimate.

- ``bootstrap_ci``: the percentile bootstrap confidence interval of one score.
- ``paired_bootstrap``: the difference between two scores on the same examples, its percentile
  interval and a two-sided p-value from the bootstrap distribution centred on the estimate
  (the paired bootstrap of Koehn, 2004); works for any per-example values, e.g. the early-minus-late
  gain of the saturation finding, a weighted combination of four models' outcomes.
- ``sign_flip_test``: the exact paired permutation test of two scores on the same binary outcomes:
  under the null hypothesis each example's two outcomes are exchangeable, so each discordant pair
  (one model right, the other wrong) flips sign with probability 1/2. The null distribution of the
  score difference is computed exactly (a convolution of binomials, one per task); for one task
  it is the exact McNemar test.

Every resampling is seeded, so a report is the same on every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from langmerge.errors import LangmergeError

RESAMPLES = 10_000
CONFIDENCE = 0.95
# Above this many support points the exact sign-flip distribution gives way to seeded Monte Carlo flips.
EXACT_SUPPORT_LIMIT = 4_000_000


def _groups(groups: Sequence[Sequence[float]], what: str) -> list[np.ndarray]:
    out = [np.asarray(g, dtype=np.float64) for g in groups]
    if not out or any(g.ndim != 1 or len(g) == 0 for g in out):
        raise LangmergeError(f"{what}: every task needs at least one example")
    return out


def grouped_mean(groups: Sequence[Sequence[float]]) -> float:
    """The mean over groups of each group's mean (the study's score)."""
    gs = _groups(groups, "score")
    return float(sum(g.mean() for g in gs) / len(gs))


def _bootstrap_means(groups: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """``resamples`` bootstrap replicates of the grouped mean (examples resampled within each group)."""
    rng = np.random.default_rng([seed, 0x5EED])
    total = np.zeros(resamples)
    for g in groups:
        idx = rng.integers(0, len(g), size=(resamples, len(g)))
        total += g[idx].mean(axis=1)
    return total / len(groups)


def _percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    groups: Sequence[Sequence[float]], *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the grouped mean; examples are resampled within their group."""
    gs = _groups(groups, "bootstrap")
    return _percentile_interval(_bootstrap_means(gs, resamples, seed), confidence)


def bootstrap_ratio_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(numerators) / sum(denominators)``, resampling the items
    (bits per character over passages: bits and characters of each passage)."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or len(num) == 0:
        raise LangmergeError("ratio bootstrap: needs as many numerators as denominators, at least one")
    rng = np.random.default_rng([seed, 0x5EED])
    idx = rng.integers(0, len(num), size=(resamples, len(num)))
    return _percentile_interval(num[idx].sum(axis=1) / den[idx].sum(axis=1), confidence)


@dataclass(frozen=True)
class PairedResult:
    difference: float  # the estimate (a - b, or the mean of the given per-example values)
    ci: tuple[float, float]  # its confidence interval
    p_value: float  # two-sided, against a difference of 0
    test: str  # which test gave the p-value
    n: int  # examples
    discordant: int | None = None  # sign-flip test: examples where the two outcomes differ

    def significant(self, level: float = 0.05) -> bool:
        return self.p_value < level

    def to_json(self) -> dict:
        return {
            "difference": self.difference,
            "ci": list(self.ci),
            "p_value": self.p_value,
            "test": self.test,
            "n": self.n,
            "discordant": self.discordant,
        }


def _paired(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]] | None) -> list[np.ndarray]:
    ga = _groups(a, "paired test")
    if b is None:
        return ga
    gb = _groups(b, "paired test")
    if [len(g) for g in ga] != [len(g) for g in gb]:
        raise LangmergeError(
            "paired test: the two models were not scored on the same examples "
            f"(examples per task {[len(g) for g in ga]} vs {[len(g) for g in gb]})"
        )
    return [x - y for x, y in zip(ga, gb)]


def paired_bootstrap(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]] | None = None,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedResult:
    """Paired bootstrap of ``score(a) - score(b)`` (or of the grouped mean of ``a`` when ``b`` is None).

    The p-value is two-sided: the share of bootstrap replicates, centred on the estimate, at least
    as far from 0 as the estimate itself, counting the estimate as one replicate ((1 + hits) / (1 + B)).
    """
    diffs = _paired(a, b)
    estimate = float(sum(d.mean() for d in diffs) / len(diffs))
    reps = _bootstrap_means(diffs, resamples, seed)
    hits = int(np.sum(np.abs(reps - estimate) >= abs(estimate) - 1e-12))
    p = 1.0 if estimate == 0 else (1 + hits) / (1 + resamples)
    return PairedResult(
        estimate, _percentile_interval(reps, confidence), min(1.0, p), "paired bootstrap", sum(len(d) for d in diffs)
    )


def _binomial_pmf(m: int) -> np.ndarray:
    k = np.arange(m + 1)
    logp = np.array([math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) for i in k]) - m * math.log(2)
    return np.exp(logp)


def sign_flip_null(weights: Sequence[int], discordant: Sequence[int]) -> tuple[np.ndarray, int]:
    """Exact null distribution of ``T = sum_t w_t * S_t``, ``S_t`` a sum of ``m_t`` independent fair ±1 flips.

    Returns ``(probabilities, offset)``: ``probabilities[j]`` is ``P(T = j - offset)``.
    """
    span = sum(w * m for w, m in zip(weights, discordant))
    dist = np.zeros(2 * span + 1)
    dist[span] = 1.0
    for w, m in zip(weights, discordant):
        if m == 0:
            continue
        pmf = _binomial_pmf(m)
        new = np.zeros_like(dist)
        for k, p in enumerate(pmf):
            shift = w * (2 * k - m)
            if shift >= 0:
                new[shift:] += p * dist[: len(dist) - shift]
            else:
                new[:shift] += p * dist[-shift:]
        dist = new
    return dist, span


def sign_flip_test(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedResult:
    """Exact paired sign-flip (permutation) test of ``score(a) - score(b)`` on binary outcomes.

    The p-value is two-sided, ``P(|T| >= |t|)`` under the null distribution (exact; seeded Monte Carlo
    flips only when the exact distribution would be too large). The interval is the paired bootstrap's.
    """
    ga, gb = _groups(a, "sign-flip test"), _groups(b, "sign-flip test")
    for g in (*ga, *gb):
        if not np.all((g == 0) | (g == 1)):
            raise LangmergeError("sign-flip test: outcomes must be 0 or 1 (use paired_bootstrap for other values)")
    boot = paired_bootstrap(a, b, resamples=resamples, confidence=confidence, seed=seed)
    diffs = _paired(a, b)
    sizes = [len(d) for d in diffs]
    lcm = reduce(lambda x, y: x * y // math.gcd(x, y), sizes)
    weights = [lcm // n for n in sizes]  # T * lcm * len(tasks): integer-valued
    discordant = [int(np.sum(d != 0)) for d in diffs]
    observed = sum(w * int(d.sum()) for w, d in zip(weights, diffs))
    m_total = sum(discordant)
    if observed == 0:
        p = 1.0
    elif sum(w * m for w, m in zip(weights, discordant)) <= EXACT_SUPPORT_LIMIT:
        dist, offset = sign_flip_null(weights, discordant)
        values = np.abs(np.arange(len(dist)) - offset)
        p = float(dist[values >= abs(observed)].sum())
    else:
        rng = np.random.default_rng([seed, 0xF11B])
        flipped = np.zeros(resamples)
        for w, d in zip(weights, diffs):
            nz = d[d != 0]
            signs = rng.choice([-1.0, 1.0], size=(resamples, len(nz)))
            flipped += w * (signs * nz).sum(axis=1)
        p = (1 + int(np.sum(np.abs(flipped) >= abs(observed)))) / (1 + resamples)
    return PairedResult(
        boot.difference, boot.ci, min(1.0, p), "exact sign-flip (McNemar for one task)", boot.n, m_total
    )


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a right and b wrong: ``b``; the reverse: ``c``)."""
    m = b + c
    if m == 0:
        return 1.0
    pmf = _binomial_pmf(m)
    return float(min(1.0, 2 * pmf[: min(b, c) + 1].sum()))


def verdict(result: PairedResult, level: float = 0.05) -> str:
    """ "reproduced" when the difference is significantly > 0, "contradicted" when significantly < 0."""
    if result.p_value < level and result.difference > 0:
        return "reproduced"
    if result.p_value < level and result.difference < 0:
        return "contradicted"
    return "inconclusive"

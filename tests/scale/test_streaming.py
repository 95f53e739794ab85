"""Streaming metrics: exact, mergeable in any order, AUC within its stated bound (exact after refining)."""

from __future__ import annotations

import numpy as np

from mixexport.verification.metrics import auc
from mixexport.verification.streaming import (RefinedCounts, ScoreStats, auc_with_bound, fixed_point_sum,
                                              refine_plan, sortable_key)


def _stats(label: np.ndarray, score: np.ndarray, cuts: list[int]) -> ScoreStats:
    s = ScoreStats()
    for lo, hi in zip([0, *cuts], [*cuts, len(label)]):
        s.merge(ScoreStats.partial(label[lo:hi], score[lo:hi]))
    return s


def test_sortable_key_is_monotone_and_merges_signed_zero() -> None:
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    k = sortable_key(x)
    assert (np.diff(k.astype(np.int64)) >= 0).all() and k[3] == k[4]


def test_sums_do_not_depend_on_partitioning() -> None:
    v = np.random.default_rng(0).random(10_001) * 16
    whole = fixed_point_sum(v)
    assert whole == sum(fixed_point_sum(v[i:i + 77]) for i in range(0, len(v), 77))
    assert whole == fixed_point_sum(v[::-1])


def test_auc_within_bound_and_exact_after_refining() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    label = (rng.random(n) < 0.3).astype(np.float32)
    score = (rng.normal(size=n) + label).astype(np.float32)
    score[:2000] = np.round(score[:2000], 1)  # true ties, across classes
    exact = auc(label, score.astype(np.float64))
    a = _stats(label, score, [5000, 5001, 12_345])
    b = _stats(label[::-1].copy(), score[::-1].copy(), [9999])
    assert np.array_equal(a.pos, b.pos) and a.logloss_units == b.logloss_units
    approx, bound = auc_with_bound(a)
    assert bound > 0 and abs(approx - exact) <= bound
    plan = refine_plan({"s": a}, target=0.0)
    refined = RefinedCounts()
    for lo in range(0, n, 3000):
        refined.merge(RefinedCounts.partial(label[lo:lo + 3000], score[lo:lo + 3000], plan.bins["s"]))
    value, left = auc_with_bound(a, refined, plan.bins["s"])
    assert left == 0.0 and abs(value - exact) <= 1e-12

from __future__ import annotations

import numpy as np
import pytest

from mixexport.verification.compare import Tolerance, compare_output, parse_tolerances
from mixexport.errors import BadInputError
from mixexport.verification.metrics import auc, kendall_tau, logloss, metric_parity, topk_overlap


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(float)
    s = np.round(rng.standard_normal(300), 1)  # many ties
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert auc(np.array([0, 1.0]), np.array([0.1, 0.9])) == 1.0
    assert np.isnan(auc(np.ones(3), np.arange(3.0)))


def test_logloss_and_kendall_and_topk() -> None:
    assert logloss(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert kendall_tau(a, a * 2) == pytest.approx(1.0)
    assert kendall_tau(a, -a) == pytest.approx(-1.0)
    assert kendall_tau(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(1 / 3)
    assert topk_overlap(a, a[::-1] * 0 + np.array([0.9, 0.5, 0.3, 0.1]), 2) == 0.5


def test_metric_parity_deltas_are_zero_for_identical_scores() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100).astype(float)
    s = rng.standard_normal(100)
    m = metric_parity(y, s, s.copy(), [np.arange(0, 50), np.arange(50, 100)])
    assert m["auc"]["delta"] == 0 and m["logloss"]["delta"] == 0
    assert m["ranking"]["kendall_tau_mean"] == 1.0 and m["ranking"]["requests_identical_order"] == 2


def test_compare_reports_min_passing_tolerances() -> None:
    e = np.array([1.0, -2.0, 0.5, 0.0])
    a = e + np.array([1e-4, 0.0, -2e-4, 1e-6])
    r = compare_output("x", a, e, Tolerance(rtol=1e-5, atol=1e-5))
    assert not r.passed
    assert r.max_abs == pytest.approx(2e-4)
    assert r.max_rel == pytest.approx(2e-4 / 2.0)  # norm-wise: max|a-e| / max|e|
    assert r.worst_index == (3,)  # |e| = 0 with a nonzero diff is the worst elementwise
    # the reported minimums do pass, and anything smaller does not
    assert compare_output("x", a, e, Tolerance(1e-5, r.min_atol)).passed
    assert not compare_output("x", a, e, Tolerance(1e-5, r.min_atol * 0.9)).passed
    nan = compare_output("x", np.array([np.nan]), np.array([1.0]), Tolerance(1, 1))
    assert not nan.passed and nan.max_abs == float("inf") and nan.outside == 1


def test_compare_counts_the_elements_outside() -> None:
    # one row far out, the rest close: what a top-k route flip looks like
    e = np.linspace(-3, 3, 256).reshape(256, 1)
    a = e + 0.01
    a[128, 0] += 0.2  # e there is ~0.01
    r = compare_output("logit", a, e, Tolerance(rtol=0.1, atol=0.1))
    assert not r.passed and r.outside == 1 and r.size == 256
    assert "1 of 256 elements outside" in r.line()
    ok = compare_output("logit", a, e, Tolerance(rtol=0.1, atol=0.3))
    assert ok.passed and ok.outside == 0 and "outside" not in ok.line()
    assert ok.to_json()["outside"] == 0


def test_parse_tolerances() -> None:
    assert parse_tolerances(("logit:1e-4", "2e-5"), "atol") == {"logit": 1e-4, "*": 2e-5}
    for bad in ("logit:", ":1", "x:-1", "abc"):
        with pytest.raises(BadInputError, match="expected NAME:VALUE"):
            parse_tolerances((bad,), "atol")

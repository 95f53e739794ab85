"""Streaming metric parity: every figure a mergeable reduction whose result does not depend on how
the rows were split into files, batches or workers.

- Sums (logloss, mean prediction, Kendall tau) are exact: each float64 term is rounded once, on its
  own, to a multiple of ``2**-FIXED_BITS`` (the same rounding whatever the partitioning), then the
  integers are added exactly (Python ints). Merge order cannot change a bit.
- Max abs / max |e| and counts are exact by nature.
- AUC: a histogram of :data:`AUC_BINS` bins over the monotone 32-bit integer image of the float32
  score (its top 20 bits), per class. Pairs in different bins are ordered exactly; pairs sharing a
  bin are counted half, so the error is at most ``sum_b pos_b * neg_b / (2 P N)``: that bound is
  computed and reported. When it exceeds the target, :func:`refine_plan` picks the bins that carry
  most of it, and a second pass counts those bins' rows at full 32-bit resolution
  (:class:`RefinedCounts`), where a shared key is a true tie and half is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

#: Fixed-point resolution of the exact sums: each term is rounded to a multiple of 2**-52.
FIXED_BITS = 52
#: AUC histogram: the top BIN_BITS bits of the 32-bit sortable key of a float32 score.
BIN_BITS = 20
AUC_BINS = 1 << BIN_BITS
LOW_BITS = 32 - BIN_BITS
#: logloss clips probabilities like mixexport.verification.metrics.logloss
EPS = 1e-7
#: At most this many rows are counted at full resolution by a refine pass (memory: ~24 B each).
REFINE_MAX_ROWS = 1 << 22


def sortable_key(score: np.ndarray) -> np.ndarray:
    """uint32 keys whose order is the order of the float32 scores (-0.0 and +0.0 share a key;
    NaN sorts above +inf)."""
    x = np.ascontiguousarray(score, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0: a tie, one key
    bits = x.view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def fixed_point_sum(values: np.ndarray) -> int:
    """sum(round(v * 2**FIXED_BITS)) as an exact Python int (|v| < 2**10 for every term)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not v.size:
        return 0
    units = np.rint(np.ldexp(v, FIXED_BITS)).astype(np.int64)  # |v| < 2**10: fits in 62 bits
    hi, lo = units >> 31, units & np.int64((1 << 31) - 1)  # each half sums in int64 for < 2**31 terms
    return (int(hi.sum()) << 31) + int(lo.sum())


def from_fixed(units: int, count: int = 1) -> float:
    """The float nearest to ``units * 2**-FIXED_BITS / count`` (correctly rounded)."""
    return float(Fraction(units, count << FIXED_BITS)) if count else float("nan")


def sigmoid32(logit: np.ndarray) -> np.ndarray:
    x = np.asarray(logit, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@dataclass
class ScoreStats:
    """Per scoring (eager or bundle) of task 0: AUC histograms and exact logloss / prediction sums."""

    pos: np.ndarray = field(default_factory=lambda: np.zeros(AUC_BINS, np.int64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(AUC_BINS, np.int64))
    logloss_units: int = 0
    prob_units: int = 0

    @staticmethod
    def partial(label: np.ndarray, logit: np.ndarray) -> dict[str, Any]:
        """A batch's contribution, sparse (only the bins it touches), to ship between processes."""
        y = label > 0.5
        binned = (sortable_key(logit) >> np.uint32(LOW_BITS)).astype(np.int64)
        p = np.clip(sigmoid32(logit), EPS, 1 - EPS)
        terms = -np.where(y, np.log(p), np.log(1 - p))
        bins, inverse = np.unique(binned, return_inverse=True)
        return {"bins": bins, "pos": np.bincount(inverse, weights=y, minlength=len(bins)).astype(np.int64),
                "neg": np.bincount(inverse, weights=~y, minlength=len(bins)).astype(np.int64),
                "logloss": fixed_point_sum(terms), "prob": fixed_point_sum(sigmoid32(logit))}

    def merge(self, part: dict[str, Any]) -> None:
        np.add.at(self.pos, part["bins"], part["pos"])
        np.add.at(self.neg, part["bins"], part["neg"])
        self.logloss_units += part["logloss"]
        self.prob_units += part["prob"]


def _auc_terms(pos: np.ndarray, neg: np.ndarray) -> tuple[int, int, int, int]:
    """(2 * pairs ordered across bins + per-bin pairs counted half twice, tie pairs, P, N) as ints."""
    used = np.flatnonzero(pos | neg)
    p, n = pos[used].astype(object), neg[used].astype(object)
    below = np.concatenate([[0], np.cumsum(neg[used])[:-1]]).astype(object)  # negatives in lower bins
    cross = int((p * below).sum()) if len(used) else 0
    ties = int((p * n).sum()) if len(used) else 0
    return 2 * cross, ties, int(pos.sum()), int(neg.sum())


@dataclass(frozen=True)
class RefinePlan:
    """The bins (per scoring) a second pass counts at full resolution."""

    bins: dict[str, np.ndarray]  # scoring name -> sorted bin indices

    def empty(self) -> bool:
        return all(len(b) == 0 for b in self.bins.values())


def auc_bound(stats: ScoreStats) -> float:
    _, ties, P, N = _auc_terms(stats.pos, stats.neg)
    return float(Fraction(ties, 2 * P * N)) if P and N else float("nan")


def refine_plan(stats: dict[str, ScoreStats], target: float) -> RefinePlan:
    """Per scoring, the fewest bins (largest pos*neg first, ties by bin index) whose exact count
    brings the AUC bound to ``target`` or below, within :data:`REFINE_MAX_ROWS` rows."""
    out = {}
    for name, s in stats.items():
        P, N = int(s.pos.sum()), int(s.neg.sum())
        mass = s.pos.astype(object) * s.neg.astype(object)
        mixed = np.flatnonzero((s.pos > 0) & (s.neg > 0))
        if not P or not N or not len(mixed):
            out[name] = np.zeros(0, np.int64)
            continue
        weights = np.asarray([float(m) for m in mass[mixed]])
        order = mixed[np.lexsort((mixed, -weights))]
        left, rows, chosen = Fraction(int(sum(mass[mixed])), 2 * P * N), 0, []
        for b in order:
            if left <= target or rows + int(s.pos[b] + s.neg[b]) > REFINE_MAX_ROWS:
                break
            chosen.append(int(b))
            rows += int(s.pos[b] + s.neg[b])
            left -= Fraction(int(mass[b]), 2 * P * N)
        out[name] = np.sort(np.asarray(chosen, dtype=np.int64))
    return RefinePlan(out)


@dataclass
class RefinedCounts:
    """Exact (key, class) counts of the rows whose bin is in a plan, merged from sparse partials."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # key << 1 | label
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @staticmethod
    def partial(label: np.ndarray, logit: np.ndarray, bins: np.ndarray) -> dict[str, Any]:
        key = sortable_key(logit)
        keep = np.isin((key >> np.uint32(LOW_BITS)).astype(np.int64), bins)
        tagged = (key[keep].astype(np.uint64) << np.uint64(1)) | (label[keep] > 0.5).astype(np.uint64)
        uniq, counts = np.unique(tagged, return_counts=True)
        return {"keys": uniq, "counts": counts.astype(np.int64)}

    def merge(self, part: dict[str, Any]) -> None:
        keys = np.concatenate([self.keys, part["keys"]])
        uniq, inverse = np.unique(keys, return_inverse=True)
        self.keys = uniq
        self.counts = np.bincount(inverse, weights=np.concatenate([self.counts, part["counts"]]),
                                  minlength=len(uniq)).astype(np.int64)


def auc_with_bound(stats: ScoreStats, refined: RefinedCounts | None = None,
                   bins: np.ndarray | None = None) -> tuple[float, float]:
    """(AUC, bound on |AUC - exact AUC|); NaN when a class is absent. Refined bins count exactly."""
    cross2, ties, P, N = _auc_terms(stats.pos, stats.neg)
    if not P or not N:
        return float("nan"), float("nan")
    within = ties  # 2 * (half of every pair sharing a bin)
    if refined is not None and bins is not None and len(bins):
        coarse = int((stats.pos[bins].astype(object) * stats.neg[bins].astype(object)).sum())
        key, label = refined.keys >> np.uint64(1), (refined.keys & np.uint64(1)).astype(bool)
        uniq, inv = np.unique(key, return_inverse=True)
        pk = np.bincount(inv, weights=np.where(label, refined.counts, 0), minlength=len(uniq)).astype(np.int64)
        nk = np.bincount(inv, weights=np.where(label, 0, refined.counts), minlength=len(uniq)).astype(np.int64)
        kb = (uniq >> np.uint64(LOW_BITS)).astype(np.int64)
        exact = 0
        for b in bins:  # within one bin: exact order of distinct keys, true ties counted half
            sel = kb == b
            p, n = pk[sel].astype(object), nk[sel].astype(object)
            below = np.concatenate([[0], np.cumsum(nk[sel])[:-1]]).astype(object)
            exact += int((2 * p * below + p * n).sum()) if sel.any() else 0
        within, ties = ties - coarse + exact, ties - coarse
    return float(Fraction(cross2 + within, 2 * P * N)), float(Fraction(ties, 2 * P * N))


@dataclass
class TauStats:
    """Kendall tau per request: exact sum, min, count, requests in identical order."""

    units: int = 0
    count: int = 0
    minimum: float = float("inf")
    identical: int = 0

    def add(self, taus: np.ndarray) -> None:
        taus = np.asarray(taus, dtype=np.float64)
        taus = taus[~np.isnan(taus)]
        if taus.size:
            self.units += fixed_point_sum(taus)
            self.count += int(taus.size)
            self.minimum = min(self.minimum, float(taus.min()))
            self.identical += int((taus == 1.0).sum())

    def merge(self, other: TauStats) -> None:
        self.units += other.units
        self.count += other.count
        self.minimum = min(self.minimum, other.minimum)
        self.identical += other.identical

    def to_json(self) -> dict[str, Any]:
        return {"kendall_tau_mean": from_fixed(self.units, self.count),
                "kendall_tau_min": self.minimum if self.count else float("nan"),
                "requests_scored": self.count, "requests_identical_order": self.identical}


@dataclass
class TensorStats:
    """Per output: max |a - e|, max |e|, elements outside tolerance, elements, non-finite outputs."""

    max_abs: float = 0.0
    max_ref: float = 0.0
    outside: int = 0
    elements: int = 0
    nonfinite: int = 0

    @staticmethod
    def partial(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> dict[str, Any]:
        a, e = np.asarray(got, np.float64), np.asarray(want, np.float64)
        finite = np.isfinite(a)
        diff = np.abs(a - e)
        return {"max_abs": float(diff[finite].max()) if finite.any() else 0.0,
                "max_ref": float(np.abs(e).max()) if e.size else 0.0,
                "outside": int((~(diff <= atol + rtol * np.abs(e))).sum()), "elements": int(a.size),
                "nonfinite": int((~finite).sum())}

    def merge(self, part: dict[str, Any]) -> None:
        self.max_abs = max(self.max_abs, part["max_abs"])
        self.max_ref = max(self.max_ref, part["max_ref"])
        self.outside += part["outside"]
        self.elements += part["elements"]
        self.nonfinite += part["nonfinite"]

    def to_json(self, rtol: float, atol: float) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "max_rel": self.max_abs / self.max_ref if self.max_ref else self.max_abs,
                "outside": self.outside, "elements": self.elements, "nonfinite": self.nonfinite,
                "rtol": rtol, "atol": atol, "passed": self.outside == 0 and self.nonfinite == 0}

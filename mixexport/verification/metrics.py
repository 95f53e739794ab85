"""Metric parity on labelled data: AUC, logloss, calibration and per-request ranking agreement,
each computed for the reference and the bundle, reported as a delta."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    avg = (starts + ends - 1) / 2.0 + 1.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney with tie correction); NaN if one class is absent."""
    label = np.asarray(label) > 0.5
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def logloss(label: np.ndarray, prob: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(prob, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(label, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall tau-b between two score vectors (1.0 for identical orderings); NaN below 2 items."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = len(a)
    if n < 2:
        return float("nan")
    iu = np.triu_indices(n, k=1)
    da = np.sign(a[:, None] - a[None, :])[iu]
    db = np.sign(b[:, None] - b[None, :])[iu]
    concordant_minus = float(np.sum(da * db))
    ties_a, ties_b = float(np.sum(da == 0)), float(np.sum(db == 0))
    pairs = float(len(da))
    denom = np.sqrt((pairs - ties_a) * (pairs - ties_b))
    if denom == 0:
        return 1.0 if np.array_equal(da, db) else float("nan")
    return concordant_minus / denom


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    k = min(k, len(a))
    if k == 0:
        return float("nan")
    ta = set(np.argsort(-np.asarray(a), kind="mergesort")[:k].tolist())
    tb = set(np.argsort(-np.asarray(b), kind="mergesort")[:k].tolist())
    return len(ta & tb) / k


def metric_parity(label: np.ndarray, ref_logit: np.ndarray, cand_logit: np.ndarray,
                  requests: Sequence[np.ndarray], k: int = 10) -> dict[str, Any]:
    """Metrics of reference and candidate logits (task 0) on the same rows, and their deltas.

    ``requests`` lists the row indices of each request (one user's candidates), for ranking
    agreement: mean/min Kendall tau and mean top-k overlap between the two scorings.
    """
    ref_p, cand_p = sigmoid(ref_logit), sigmoid(cand_logit)
    out: dict[str, Any] = {"rows": int(len(label)), "requests": len(requests),
                           "positive_rate": float(np.mean(label))}
    for key, fn in (("auc", lambda p: auc(label, p)), ("logloss", lambda p: logloss(label, p)),
                    ("mean_prediction", lambda p: float(np.mean(p)))):
        r, c = fn(ref_p), fn(cand_p)
        out[key] = {"reference": r, "bundle": c, "delta": c - r}
    pr = out["positive_rate"]
    out["calibration"] = {"reference": out["mean_prediction"]["reference"] / pr if pr else float("nan"),
                          "bundle": out["mean_prediction"]["bundle"] / pr if pr else float("nan")}
    out["calibration"]["delta"] = out["calibration"]["bundle"] - out["calibration"]["reference"]
    taus = [kendall_tau(ref_logit[idx], cand_logit[idx]) for idx in requests if len(idx) >= 2]
    taus = [t for t in taus if not np.isnan(t)]
    overlaps = [topk_overlap(ref_logit[idx], cand_logit[idx], k) for idx in requests if len(idx) > 0]
    out["ranking"] = {"kendall_tau_mean": float(np.mean(taus)) if taus else float("nan"),
                      "kendall_tau_min": float(np.min(taus)) if taus else float("nan"),
                      f"top{k}_overlap_mean": float(np.mean(overlaps)) if overlaps else float("nan"),
                      "requests_identical_order": int(sum(t == 1.0 for t in taus))}
    return out

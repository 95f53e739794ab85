"""The merge of workers' partials into one report. Every merge is exact and order-free, so the
report is the same bytes whatever the files, batches, actors or engine."""

from __future__ import annotations

from typing import Any

from mixexport.scale.worker import Fragments
from mixexport.verification.streaming import (RefinedCounts, RefinePlan, ScoreStats, TauStats, TensorStats,
                                              auc_with_bound, from_fixed, refine_plan)

SCORINGS = ("eager", "bundle")


class Totals:
    """Running totals of a verify pass (one process holds them: the driver)."""

    def __init__(self) -> None:
        self.rows = 0
        self.positives = 0
        self.labelled = False
        self.scores = {name: ScoreStats() for name in SCORINGS}
        self.tensor: dict[str, TensorStats] = {}
        self.tau = TauStats()
        self.fragments = Fragments()
        self.refined = {name: RefinedCounts() for name in SCORINGS}

    def merge(self, part: dict[str, Any]) -> None:
        if "tensor" not in part:  # a refine pass: only the full-resolution AUC counts
            for name, counts in part.get("refined", {}).items():
                self.refined[name].merge(counts)
            return
        self.rows += part["rows"]
        for k, t in part["tensor"].items():
            self.tensor.setdefault(k, TensorStats()).merge(t)
        if "scores" in part:
            self.labelled = True
            self.positives += part["positives"]
            for name, s in part["scores"].items():
                self.scores[name].merge(s)
        self.tau.merge(part["tau"])
        self.fragments.add(part["fragments"])

    def finish_file(self, path: str) -> None:
        self.fragments.finish(self.tau, path)

    def plan(self, target: float) -> RefinePlan:
        return refine_plan(self.scores, target) if self.labelled else RefinePlan({n: [] for n in SCORINGS})

    def report(self, tolerances: dict[str, tuple[float, float]], plan: RefinePlan | None,
               auc_target: float) -> dict[str, Any]:
        """The JSON report: only quantities independent of partitioning (no file names, no timings)."""
        self.fragments.finish(self.tau)
        default = tolerances.get("*", (1e-5, 1e-5))
        tensor = {k: t.to_json(*tolerances.get(k.split("[")[0], default)) for k, t in sorted(self.tensor.items())}
        out: dict[str, Any] = {"rows": self.rows, "tensor": tensor, "ranking": self.tau.to_json()}
        if not self.labelled:
            out["metrics"] = {"status": "skipped", "reason": "no label column"}
            return out
        n = self.rows
        m: dict[str, Any] = {"positive_rate": from_fixed(self.positives << 52, n)}
        for name in SCORINGS:
            bins = plan.bins.get(name) if plan is not None else None
            auc, bound = auc_with_bound(self.scores[name], self.refined[name] if bins is not None else None, bins)
            m.setdefault("auc", {})[name] = auc
            m["auc"][f"{name}_bound"] = bound
            m["auc"][f"{name}_refined_bins"] = 0 if bins is None else int(len(bins))
            m.setdefault("logloss", {})[name] = from_fixed(self.scores[name].logloss_units, n)
            m.setdefault("mean_prediction", {})[name] = from_fixed(self.scores[name].prob_units, n)
            m.setdefault("calibration", {})[name] = (from_fixed(self.scores[name].prob_units, self.positives)
                                                     if self.positives else float("nan"))
        for key in ("auc", "logloss", "mean_prediction", "calibration"):
            m[key]["delta"] = m[key]["bundle"] - m[key]["eager"]
        m["auc"]["delta_bound"] = m["auc"]["eager_bound"] + m["auc"]["bundle_bound"]
        m["auc"]["target_bound"] = auc_target
        out["metrics"] = m
        return out

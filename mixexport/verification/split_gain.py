"""What a split bought, measured: a bundle built with ``split-user-item`` timed in the same ``bench``
run as an unsplit build of the same model (``--compare``), per N the unsplit p50 over the split p50
beside the FLOP speed-up the pass predicted (its manifest report).

The prediction counts matrix-multiply FLOPs only; the measurement also pays what the split adds (the
user state gathered to the candidates, a second session call) and what it saves beyond FLOPs (the
user side's embedding lookups). Both are printed so a user sees how far the model's FLOPs explain
its latency.
"""

from __future__ import annotations

from typing import Any, Mapping

SPLIT = "split-user-item"


def _split_report(manifest: Any) -> dict[str, Any] | None:
    return next((p.get("report") or {} for p in manifest.data.get("passes", []) if p.get("name") == SPLIT), None)


def split_gain(bundle: Any, label: str, compared: Mapping[str, Any], runners: Mapping[str, Any]
               ) -> dict[str, Any]:
    """``{"split_gain": …}`` when one of the bundle (runner ``label``) and the ``compared`` bundles
    (runner name → manifest) has the split and another has not; ``{}`` otherwise. Per N:
    ``measured`` (unsplit p50 / split p50: > 1 means the split is faster) and ``predicted``."""
    timed = {label: bundle, **compared}
    split = next(((name, m) for name, m in timed.items() if _split_report(m) is not None), None)
    unsplit = next((name for name, m in timed.items() if _split_report(m) is None), None)
    if split is None or unsplit is None:
        return {}
    name, manifest = split
    predicted = (_split_report(manifest) or {}).get("predicted_speedup", {})
    per_n = {}
    for n, s in runners[name].items():
        u = runners[unsplit].get(n)
        if u is None or not s.get("p50_ms"):
            continue
        pred = predicted.get(n)
        per_n[n] = {"split_p50_ms": s["p50_ms"], "unsplit_p50_ms": u["p50_ms"],
                    "measured": u["p50_ms"] / s["p50_ms"], "predicted": pred}
    return {"split_gain": {"split": name, "unsplit": unsplit, "per_n": per_n,
                           "never_slower": all(v["measured"] >= 1.0 for v in per_n.values())}}


def split_gain_markdown(latency: Mapping[str, Any]) -> list[str]:
    """One line per N: measured beside predicted (empty when the bench had no split/unsplit pair)."""
    gain = latency.get("split_gain")
    if not gain:
        return []
    cells = [f"N={n}: {v['measured']:.2f}x measured"
             + (f" / {v['predicted']:.2f}x predicted" if v.get("predicted") else "") for n, v in gain["per_n"].items()]
    return ["", f"Split vs unsplit (unsplit p50 / split p50; predicted: the split's FLOP ratio): {'; '.join(cells)}"]

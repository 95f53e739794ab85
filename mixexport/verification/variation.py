"""Did the tensor parity checks see varied ids? A check on constant ids proves little: a model whose
id 0 is its padding id masks everything and agrees with any bundle (issue 27: a BST "passed" with
max rel err 0.0 on id 0 everywhere).

The tensor gate is "not checked" when an integer input column held a single id across every check
request while more could occur: its range is unknown (example requests then use id 0 only), or its
range admits more than two ids (random ids across it agree by chance with probability under
3 · 3^-k for k draws; a column of one or two valid ids may legitimately hold one). ``verify`` then
refuses to PASS unless labelled rows (``--data``, or the model's known dataset) were scored too.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from mixexport.specs import Request, TensorSpec


def unvaried_ids(specs: Iterable[TensorSpec], requests: Iterable[Request]) -> list[str]:
    """Integer inputs (``name`` or ``name column k``) that held one id in every request although
    more could occur."""
    specs = [s for s in specs if np.dtype(s.dtype).kind in "iu"]
    seen: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    for req in requests:
        for part in (req.user, req.item):
            for name, arr in part.items():
                if name in seen:
                    seen[name].append(np.asarray(arr))
    out = []
    for s in specs:
        arrays = [a for a in seen[s.name] if a.size]
        if not arrays:
            continue
        ranges = s.id_ranges()
        per_column = ranges is not None and len(ranges) > 1
        columns = [a.reshape(-1, len(ranges)) if per_column else a.reshape(-1, 1) for a in arrays]  # type: ignore[arg-type]
        values = np.concatenate(columns)
        for k in range(values.shape[1]):
            r = ranges[k if per_column else 0] if ranges is not None else None
            could_vary = r is None or r.high is None or r.high - r.low > 2
            if could_vary and np.unique(values[:, k]).size <= 1:
                out.append(f"{s.name} column {k}" if per_column else s.name)
    return out


def not_checked(unvaried: list[str], real_rows: bool) -> dict[str, Any]:
    """The report entry for a tensor gate whose ids did not vary, and whether it blocks a PASS."""
    only = ", ".join(unvaried)
    reason = (f"ids of {only} held one value in every check request (no id range found, or none drawn): "
              "parity on constant ids cannot see a difference")
    return {"status": "not checked", "inputs": unvaried, "reason": reason, "blocks_pass": not real_rows,
            "message": f"tensor parity not checked: {reason}; "
                       + ("labelled rows were scored, so metric parity stands in" if real_rows else
                          "pass --data FILE.npz with real rows (verify refuses to PASS on constant ids alone)")}


def mark_tensor_gate(source_specs: Iterable[TensorSpec], requests: Iterable[Request], tensor: list[dict[str, Any]],
                     metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Give every tensor parity entry its ``status`` (PASS, FAIL or "not checked") and return the
    not-checked entry (None when the ids varied)."""
    unvaried = unvaried_ids(source_specs, requests)
    entry = not_checked(unvaried, metrics.get("status") in ("PASS", "FAIL")) if unvaried else None
    for t in tensor:
        t["status"] = "not checked" if entry else ("PASS" if t["passed"] else "FAIL")
    return entry


def gate_status(failures: list[str], entry: dict[str, Any] | None) -> str:
    """PASS, FAIL, or NOT CHECKED when the only thing missing is a check on varied ids."""
    if not failures:
        return "PASS"
    return "NOT CHECKED" if entry is not None and failures == [entry["message"]] else "FAIL"

"""Interval arithmetic of id ranges (:mod:`mixexport.program.ids` finds the steps in the graph):
where non-negative ids land after a chain of constant steps (:func:`image`), which ids land inside a
table (:func:`preimage`), and how ranges are told to users and to older manifest readers.

A chain is the steps between an input and the index of a table, in order: ``("add", c)``,
``("mul", c)`` (c > 0), ``("mod", m)``, ``("and", mask)`` or ``("clamp", (lo, hi))``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mixexport.specs import IdRanges, TensorSpec

INF = math.inf
Chain = tuple[tuple[str, Any], ...]  # ("add" | "mul" | "mod" | "and", value) or ("clamp", (lo, hi))


def text(kind: str, v: Any) -> str:
    if kind == "clamp":
        return f"clamp({'' if v[0] == -INF else int(v[0])}, {'' if v[1] == INF else int(v[1])})"
    return {"add": f"{'+' if v >= 0 else '-'} {abs(int(v))}", "mul": f"* {int(v)}", "mod": f"% {int(v)}",
            "and": f"& {int(v)}"}[kind]


def image(chain: Chain) -> tuple[float, float]:
    """Where ids >= 0 land after ``chain``: an interval [low, high)."""
    low, high = 0.0, INF
    for kind, v in chain:
        if kind == "add":
            low, high = low + v, high + v
        elif kind == "mul":
            low, high = low * v, high * v
        elif kind == "clamp":
            low, high = min(max(low, v[0]), v[1]), min(max(high - 1, v[0]), v[1]) + 1
        else:
            width = v if kind == "mod" else v + 1
            if not (low >= 0 and high <= width):
                low, high = 0.0, float(width)
    return low, high


def preimage(chain: Chain, low: float, high: float) -> tuple[float, float] | None:
    """The ids x >= 0 (an interval [low, high)) whose value after ``chain`` lies in [low, high)."""
    for kind, v in reversed(chain):
        if kind == "add":
            low, high = low - v, high - v
        elif kind == "mul":
            low, high = math.ceil(low / v), math.ceil(high / v) if high != INF else INF
        elif kind == "clamp":
            lo, hi = v
            new_low = -INF if low <= lo < high else max(low, lo)
            new_high = INF if low <= hi < high else min(high, hi + 1)
            low, high = new_low, new_high
        else:  # x % m lies in [0, m) for x >= 0; x & m in [0, m]
            width = v if kind == "mod" else v + 1
            if low <= 0 and width <= high:
                low, high = 0.0, INF  # every non-negative id lands inside
            else:
                low, high = max(low, 0.0), min(high, width)
    low = max(low, 0.0)
    return (low, high) if low < high else None


def compat_vocab(ranges: IdRanges | None) -> int | tuple[int, ...] | None:
    """The ranges as the older ``vocab`` field (``0 <= id < vocab`` per column), for readers that
    know only that field; None where it cannot say the same (an open, unknown or shifted range)."""
    if not ranges or any(r is None or r.low != 0 or r.high is None for r in ranges):
        return None
    bounds = tuple(int(r.high) for r in ranges if r is not None and r.high is not None)
    return bounds[0] if len(bounds) == 1 else bounds


def id_notes(specs: tuple[TensorSpec, ...]) -> list[str]:
    """What ``inspect`` and the report say about integer inputs: each range found and how, and a
    warning for every input or column no range was found for."""
    notes = []
    for s in specs:
        if np.dtype(s.dtype).kind not in "iu":
            continue
        ranges = s.id_ranges()
        unknown = [] if ranges is None else [k for k, r in enumerate(ranges) if r is None]
        if ranges is None or len(unknown) == len(ranges):
            notes.append(f"warning: int input {s.name}: no id range found (it reaches no embedding, index_select, "
                         "gather or index through casts, offsets, clamps or modulo); example and check requests "
                         "use id 0 only, so verify cannot PASS without --data FILE.npz holding real rows")
            continue
        if unknown:
            notes.append(f"warning: int input {s.name}: no id range found for columns {unknown}; those columns "
                         "use id 0 in example and check requests (verify needs --data FILE.npz to PASS)")
        shown = [f"{'' if len(ranges) == 1 else f'column {k}: '}{r.allows()} ({r.via})"
                 for k, r in enumerate(ranges) if r is not None]
        notes.append(f"int input {s.name}: ids {'; '.join(shown)}")
    return notes

"""Tensor parity per output, with the smallest tolerance that would have passed.

Definitions (``a`` = candidate, ``e`` = expected/reference, elementwise over an output):

- ``max_abs`` = max |a - e|, ``mean_abs`` = mean |a - e|;
- ``max_rel`` = max |a - e| / max |e| — the norm-wise (infinity-norm) relative error, the number
  gated by "max relative error ≤ 1e-4": it is scale-aware and does not explode on logits that
  happen to sit near zero;
- ``max_elem_rel`` = max |a - e| / |e| over elements with |e| > 0, with its ``worst_index``;
- ``cosine`` similarity of the flattened outputs;
- PASS iff every element satisfies |a - e| <= atol + rtol·|e| (numpy.allclose semantics);
- ``min_atol``: the smallest atol that passes at the configured rtol; ``min_rtol``: the smallest
  rtol that passes at the configured atol;
- ``outside``: how many elements fail the tolerance (a few rows far out, the rest close, is what a
  discontinuous choice such as an MoE top-k route flipping near a tie looks like).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from mixexport.errors import BadInputError

#: Per-precision defaults; a family or the user (``--atol name:value``) may override per output.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {  # precision -> (rtol, atol)
    "fp32": (1e-5, 1e-5),
    "fp16": (1e-2, 1e-3),
    "bf16": (2e-2, 1e-2),
    "w8a16": (5e-2, 5e-2),
    "int8": (1e-1, 1e-1),  # int8 activations too: per-row rounding of every GEMM input
}
#: externalized table rows stored in a reduced dtype round every lookup like weights of this precision
#: (int8 rows carry a float32 scale per row, as W8A16 weights do per output channel)
ROW_PRECISION = {"float32": "fp32", "float16": "fp16", "int8": "w8a16"}


def gate_precision(precision: str, row_dtypes: Iterable[str] = ()) -> str:
    """The precision whose tolerances and AUC gate a bundle is held to: its own, or the loosest of its
    externalized tables' row dtypes (float16 rows in an fp32 bundle round like fp16 weights)."""
    order = list(DEFAULT_TOLERANCES)
    held = [precision] + [ROW_PRECISION.get(d, "fp32") for d in row_dtypes]
    return max(held, key=lambda p: order.index(p) if p in order else 0)


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


@dataclass(frozen=True)
class OutputParity:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    max_elem_rel: float
    worst_index: tuple[int, ...]
    cosine: float
    rtol: float
    atol: float
    min_atol: float
    min_rtol: float
    passed: bool
    outside: int = 0

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        return d

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        where = "" if self.passed else f" ({self.outside} of {self.size} elements outside, mean_abs {self.mean_abs:.3g})"
        return (f"{status} {self.name}: max_abs {self.max_abs:.3g}, max_rel {self.max_rel:.3g}, "
                f"cosine {self.cosine:.9f}{where}; smallest passing atol {self.min_atol:.3g} (at rtol "
                f"{self.rtol:g}) / rtol {self.min_rtol:.3g} (at atol {self.atol:g})")


def compare_output(name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> OutputParity:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise BadInputError(f"output {name!r}: shape {list(a.shape)} differs from the reference's "
                            f"{list(e.shape)}", "the bundle does not compute the same function")
    if a.size == 0:
        return OutputParity(name, tuple(a.shape), 0.0, 0.0, 0.0, 0.0, (), 1.0, tol.rtol, tol.atol, 0.0, 0.0, True)
    diff = np.abs(a - e)
    diff = np.where(np.isnan(a) != np.isnan(e), np.inf, np.nan_to_num(diff, nan=0.0))
    ref_max = float(np.max(np.abs(e)))
    with np.errstate(divide="ignore", invalid="ignore"):
        elem_rel = np.where(np.abs(e) > 0, diff / np.abs(e), np.where(diff > 0, np.inf, 0.0))
        need_rtol = np.where(np.abs(e) > 0, (diff - tol.atol) / np.abs(e), np.where(diff > tol.atol, np.inf, 0.0))
    worst = np.unravel_index(int(np.argmax(elem_rel)), a.shape)
    na, ne = np.linalg.norm(a.ravel()), np.linalg.norm(e.ravel())
    cosine = float(a.ravel() @ e.ravel() / (na * ne)) if na > 0 and ne > 0 else float(na == ne)
    max_abs = float(diff.max())
    outside = int(np.count_nonzero(~(diff <= tol.atol + tol.rtol * np.abs(e))))
    return OutputParity(
        name=name, shape=tuple(a.shape), max_abs=max_abs, mean_abs=float(diff.mean()),
        max_rel=max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf")),
        max_elem_rel=float(elem_rel.max()), worst_index=tuple(int(i) for i in worst), cosine=cosine,
        rtol=tol.rtol, atol=tol.atol,
        min_atol=float(max(0.0, np.max(diff - tol.rtol * np.abs(e)))),
        min_rtol=float(max(0.0, np.max(need_rtol))),
        passed=outside == 0, outside=outside,
    )


def compare_outputs(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                    tolerances: Mapping[str, Tolerance], default: Tolerance) -> list[OutputParity]:
    """Parity of every expected output (all of them, failing or not)."""
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise BadInputError(f"the bundle did not produce outputs {missing}", "rebuild the bundle")
    return [compare_output(name, actual[name], expected[name], tolerances.get(name, default))
            for name in expected]


_TOL_RE = re.compile(r"^(?P<name>[A-Za-z_][\w.\-/]*)?:?(?P<value>[0-9.eE+\-]+)$")


def parse_tolerances(specs: tuple[str, ...], what: str) -> dict[str, float]:
    """Parse ``--atol name:value`` / ``--rtol value`` options; ``*`` or no name = every output."""
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.rpartition(":")
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if not (v >= 0) or (sep and not name):
            raise BadInputError(f"--{what} {spec!r}: expected NAME:VALUE or VALUE with VALUE >= 0",
                                f"e.g. --{what} logit:1e-4 or --{what} 1e-4")
        out[name or "*"] = v
    return out


def resolve_tolerances(outputs: list[str], precision: str, atol: Mapping[str, float],
                       rtol: Mapping[str, float], family_default: tuple[float, float] | None = None
                       ) -> tuple[dict[str, Tolerance], Tolerance]:
    base_r, base_a = family_default or DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])
    unknown = sorted((set(atol) | set(rtol)) - set(outputs) - {"*"})
    if unknown:
        raise BadInputError(f"tolerance given for unknown outputs {unknown}; outputs are {outputs}",
                            "use an output name from the manifest")
    default = Tolerance(rtol.get("*", base_r), atol.get("*", base_a))
    per = {n: Tolerance(rtol.get(n, default.rtol), atol.get(n, default.atol)) for n in outputs}
    return per, default

"""Fuzzed parity on users' own programs: ``.pt2`` files handed in by the caller (the corpus of
third-party architectures in ``tests/corpus/``, or any other set), each built with one pass/precision
combination, then scored on random U × N requests whose ids span their whole ranges.

The fuzzer of reference families (:mod:`mixexport.testing.fuzz`) draws model configs; a program is
fixed, so here the cases cycle through the entries and the draws are the request shape, how
candidates map to users and, for a program with a dynamic sequence axis, the sequence length. The
caller supplies the programs as :class:`ProgramEntry` values (a ``save`` function that writes the
``.pt2``), so the corpus stays a test asset and nothing under ``tests/`` is imported by the package.

Ids matter: a request built from id 0 alone can hide every difference (id 0 is often the padding id
that masks the whole history). :func:`ranged_request` draws every declared id input across
``[0, bound)`` and puts both ends, the padding id 0 and ``bound - 1``, into every request.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mixexport.testing.fuzz import USER_INDEX_MODES, _error, finished, run_case, score_request, scored
from mixexport.testing.fuzz_configs import Chooser


@dataclass(frozen=True)
class ProgramEntry:
    """One program the fuzz may draw: ``save(path, seed)`` writes it as a ``.pt2``; ``passes`` and
    ``precision`` are the build's; ``ids`` gives each integer input's exclusive id bound (its table's
    rows, or a hashed input's raw id space); ``seq_lens``: request sequence lengths to draw from (a
    program with a dynamic sequence axis; empty: the program's own)."""

    name: str
    save: Callable[[Path, int], Path]
    passes: tuple[str, ...] = ()
    precision: str = "fp32"
    ids: Mapping[str, int] = field(default_factory=dict)
    seq_lens: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name}[{','.join(self.passes) or 'none'}/{self.precision}]"


@dataclass(frozen=True)
class ProgramCase:
    """One draw: an entry, the request shape and its user mapping (replayable from ``choices``)."""

    entry: ProgramEntry
    seed: int
    users: int
    candidates: int
    user_index: str
    seq_len: int | None = None
    choices: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.entry.label

    def describe(self) -> str:
        seq = f", seq_len {self.seq_len}" if self.seq_len is not None else ""
        return f"{self.label} U={self.users} N={self.candidates} ({self.user_index}{seq}) seed={self.seed}"


def make_program_case(entry: ProgramEntry, choose: Chooser, seed: int) -> ProgramCase:
    """Draw one request shape for ``entry`` (options simplest first, as the family fuzzer's)."""
    users = choose("users", (1, 2, 3, 5))
    candidates = choose("candidates", (1, 7, 2, 16, 33, 64))
    mode = choose("user_index", USER_INDEX_MODES)
    seq_len = choose("seq_len", entry.seq_lens) if entry.seq_lens else None
    return ProgramCase(entry, seed, users, candidates, mode, seq_len, dict(choose.choices))


def generate_program_cases(entries: Sequence[ProgramEntry], count: int, seed: int, start: int = 0
                           ) -> list[ProgramCase]:
    """Cases ``start .. start+count-1``, cycling through ``entries`` (case ``i`` is entry ``i mod len``,
    so ``len(entries)`` cases cover each once); case ``i`` depends only on ``(seed, i)`` and ``entries``."""
    if not entries:
        raise ValueError("generate_program_cases needs at least one program entry")
    return [make_program_case(entries[i % len(entries)], Chooser(random.Random(f"mixexport-program-fuzz:{seed}:{i}")),
                              seed=seed * 100_000 + i) for i in range(start, start + count)]


def ranged_request(source: Any, ids: Mapping[str, int], users: int, candidates: int, seed: int,
                   user_index: str = "interleaved", seq_len: int | None = None) -> Any:
    """A U × N request of ``source`` whose id inputs named in ``ids`` are drawn across ``[0, bound)``,
    both ends included (the first element of each is 0, the last ``bound - 1``); floats and the
    shapes come from the source's own example request."""
    from mixexport.specs import Request

    base = source.example_request(users, candidates, seed=seed, seq_len=seq_len)
    rng = np.random.default_rng(seed)

    def draw(name: str, arr: np.ndarray) -> np.ndarray:
        if name not in ids or arr.dtype.kind not in "iu" or not arr.size:
            return arr
        out = rng.integers(0, ids[name], size=arr.shape).astype(arr.dtype)
        flat = out.reshape(-1)
        flat[0], flat[-1] = 0, ids[name] - 1
        return out

    n, u = candidates, users
    index = {"interleaved": np.arange(n) % u, "blocks": np.arange(n) * u // n,
             "random": rng.integers(0, u, size=n), "first-user": np.zeros(n)}[user_index]
    return Request(user={k: draw(k, v) for k, v in base.user.items()},
                   item={k: draw(k, v) for k, v in base.item.items()},
                   user_index=index.astype(np.int64),
                   user_ids=tuple(f"program-fuzz-{seed}-u{i}" for i in range(u)))


def score_program(bundle: Path, pt2: Path, request: Any) -> dict[str, Any]:
    """``request`` through the bundle's runtime vs the eager program (:func:`~mixexport.testing.fuzz.score_request`)."""
    from mixexport.source import load_source

    return score_request(bundle, load_source(pt2), request)


def run_any_case(case: Any, workdir: str | Path, keep: bool = False, engines: str | None = None) -> dict[str, Any]:
    """A family :class:`~mixexport.testing.fuzz.Case` through :func:`~mixexport.testing.fuzz.run_case`, a
    :class:`ProgramCase` (a user's own ``.pt2``, e.g. from the test corpus) through
    :func:`run_program_case`, on ONNX Runtime whatever ``engines`` says."""
    if isinstance(case, ProgramCase):
        return run_program_case(case, workdir, keep)
    return run_case(case, workdir, keep, engines)


def run_program_case(case: ProgramCase, workdir: str | Path, keep: bool = False) -> dict[str, Any]:
    """Save the program → build (verify included) → score the case's ranged request. Never raises for
    a failure of the case: the result says ``passed``, the ``stage`` reached and every error."""
    from mixexport.pipeline import BuildOptions, build
    from mixexport.source import load_source

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"bundle-{case.seed}"
    t0 = time.perf_counter()
    result: dict[str, Any] = {"label": case.label, "describe": case.describe(), "passed": False, "errors": []}
    stage = "save"
    try:
        pt2 = case.entry.save(work / f"{case.entry.name}-{case.seed}.pt2", case.seed)
        stage = "build"
        built = build(pt2, BuildOptions(out=out, passes=case.entry.passes, precision=case.entry.precision,
                                        bench=False, metrics=False, force=True))
        result["verify_max_rel"] = built.parity["max_rel"]
        stage = "score"
        request = ranged_request(load_source(pt2), case.entry.ids, case.users, case.candidates, case.seed,
                                 case.user_index, case.seq_len)
        stage = scored(result, score_program(out, pt2, request))
    except Exception as e:  # noqa: BLE001 - the report carries every failure, with its traceback
        result["errors"].append(_error(stage, e))
    return finished(result, stage, t0, out, keep)

"""Fuzzed parity: random valid model configs × request shapes × pass combinations, each built and
verified by the real pipeline, then scored against the eager model.

A :class:`Case` is drawn by the family's sampler (:mod:`mixexport.testing.fuzz_configs`) from a
:class:`Chooser`: every random decision is a named choice among options listed **simplest first**
(fewest tokens, one layer, …). The chooser records the index it took per name, so a case can be
replayed exactly from its ``choices`` and shrunk by lowering indices (:func:`shrink`) —
hypothesis-style, without hypothesis's budget of hundreds of builds.

:func:`run_case` does what a user does: ``save_checkpoint`` of a randomly initialised model,
``pipeline.build`` (which runs ``verify_bundle`` and refuses a failing bundle), then one request
of the case's U users × N candidates through :class:`~mixexport.runtime.Runtime` against
``Runtime.reference``, at the tolerance the bundle's precision implies, scored twice (the second
time from the per-user caches, which must give identical outputs).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mixexport.testing.fuzz_configs import SAMPLERS, Chooser


SPLIT, KV, PACK, QUANT = "split-user-item", "extract-kv-cache", "pack-moe-experts", "quantize-w8a16"
INT8 = "quantize-int8"  # what --precision int8 adds
#: Every case also draws where its embedding tables live: in the graph, or out of it
#: (externalize-embeddings with every table that can go, served by the local table store).
EXT, TABLES = "externalize-embeddings", ("in-graph", "external")
EXT_OPTIONS = ("externalize-embeddings.min_bytes=0",)
#: Every applicable pass combination per family (pipeline order): none, each program pass, and
#: quantize-w8a16 alone and after it. tokenmixer-large's combinations with pack-moe-experts force
#: ``moe=True``; the others draw ``moe`` too (dense tokenmixer-large: [] and [quantize]). mixformer's
#: combinations with split-user-item force ``ui=True``; the others draw UI-MixFormer or plain MixFormer.
COMBOS: dict[str, tuple[tuple[str, ...], ...]] = {
    "rankmixer": ((), (QUANT,)),
    "ugsep": ((), (SPLIT,), (QUANT,), (SPLIT, QUANT)),
    "longer": ((), (KV,), (QUANT,), (KV, QUANT)),
    "rankmixer-moe": ((), (PACK,), (QUANT,), (PACK, QUANT)),
    "tokenmixer-large": ((), (PACK,), (QUANT,), (PACK, QUANT)),
    "mixformer": ((), (SPLIT,), (QUANT,), (SPLIT, QUANT)),
    "hyformer": ((), (KV,), (QUANT,), (KV, QUANT)),
    "pyramid-mixer": ((), (SPLIT,), (QUANT,), (SPLIT, QUANT)),
    "msn": ((), (SPLIT,), (QUANT,), (SPLIT, QUANT)),
}
#: int8 compute (``--precision int8``) after each family's serving pass: listed after every COMBOS
#: combination, so the indices of those (and the CI slice's cases of them) are unchanged.
INT8_COMBOS: dict[str, tuple[tuple[str, ...], ...]] = {
    "rankmixer": ((INT8,),),
    "ugsep": ((SPLIT, INT8),),
    "longer": ((KV, INT8),),
    "rankmixer-moe": ((PACK, INT8),),
    "tokenmixer-large": ((PACK, INT8),),
    "mixformer": ((SPLIT, INT8),),
    "hyformer": ((KV, INT8),),
    "pyramid-mixer": ((SPLIT, INT8),),
    "msn": ((INT8,),),
}
USER_INDEX_MODES = ("interleaved", "blocks", "random", "first-user")
#: Smallest normalised width (LayerNorm/RMSNorm) of cases with quantize-w8a16. A norm over 1-2
#: values is a (near) sign function: any weight rounding can flip it, so w8a16's 5e-2 tolerance
#: is not a property such a model has (fp32 cases keep the degenerate widths).
QUANT_MIN_WIDTH = 8


def combinations() -> list[tuple[str, tuple[str, ...]]]:
    """Every (family, passes) pair the fuzzer covers, in a fixed order."""
    return [(family, passes) for table in (COMBOS, INT8_COMBOS) for family, combos in table.items()
            for passes in combos]


@dataclass(frozen=True)
class Case:
    """One fuzz case: a family config (as its checkpoint dict), passes and one request shape."""

    family: str
    passes: tuple[str, ...]
    seed: int                      # weights (torch.manual_seed) and request contents
    config: dict[str, Any]         # Config as config_to_dict writes it
    users: int                     # U
    candidates: int                # N
    user_index: str                # one of USER_INDEX_MODES
    seq_len: int | None = None     # request sequence length (dynamic-sequence families only)
    choices: dict[str, int] = field(default_factory=dict)
    tables: str = "in-graph"       # one of TABLES: "external" adds externalize-embeddings to the build

    @property
    def build_passes(self) -> tuple[str, ...]:
        return self.passes + ((EXT,) if self.tables == "external" else ())

    @property
    def label(self) -> str:
        return f"{self.family}[{','.join(self.passes) or 'none'}]"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passes"] = list(self.passes)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Case:
        return cls(**{**d, "passes": tuple(d["passes"])})


def make_case(family: str, passes: tuple[str, ...], choose: Chooser, seed: int) -> Case:
    """Draw one case of ``family`` with ``passes`` (a config every pass applies to)."""
    from mixexport.models.common import config_to_dict

    quantized = QUANT in passes or INT8 in passes
    config, seq_len = SAMPLERS[family](choose, moe=True if PACK in passes else None,
                                       min_width=QUANT_MIN_WIDTH if quantized else 1, quantized=quantized,
                                       split=SPLIT in passes)
    users = choose("users", (1, 2, 3, 5))
    candidates = choose("candidates", (1, 7, 2, 16, 33, 64))
    mode = choose("user_index", USER_INDEX_MODES)
    tables = choose("tables", TABLES)  # drawn last: the earlier choices of a recorded case are unchanged
    return Case(family, tuple(passes), seed, config_to_dict(config), users, candidates, mode, seq_len,
                dict(choose.choices), tables)


def replay(case: Case, forced: Mapping[str, int] | None = None) -> Case:
    """The case rebuilt from its recorded choices (with ``forced`` overriding some of them)."""
    return make_case(case.family, case.passes, Chooser(forced={**case.choices, **(forced or {})}), case.seed)


def generate_cases(count: int, seed: int, limit: int | None = None, families: Sequence[str] | None = None,
                   forced: Mapping[str, int] | None = None, start: int = 0, with_pass: str | None = None
                   ) -> list[Case]:
    """Cases ``start .. start+count-1``, cycling through every (family, passes) combination; case
    ``i`` depends only on ``(seed, i)`` (and the filters), so one can be re-run alone. ``limit`` keeps
    each draw among its first options; ``forced`` fixes some choices (e.g. ``{"layers": 0}``: one
    layer); ``families`` and ``with_pass`` keep the combinations of those families / with that pass."""
    combos = [c for c in combinations() if (families is None or c[0] in families)
              and (with_pass is None or with_pass in c[1])]
    out = []
    for i in range(start, start + count):
        family, passes = combos[i % len(combos)]
        rng = random.Random(f"mixexport-fuzz:{seed}:{i}")
        out.append(make_case(family, passes, Chooser(rng, forced, limit), seed=seed * 100_000 + i))
    return out


# ------------------------------------------------------------------------------------------------
# running a case

def make_request(case: Case, source: Any) -> Any:
    """The case's U × N request: random valid rows, ``user_index`` per the case's mode, user ids."""
    from mixexport.specs import Request

    base = source.example_request(case.users, case.candidates, seed=case.seed, seq_len=case.seq_len)
    n, u = case.candidates, case.users
    rng = np.random.default_rng(case.seed)
    index = {"interleaved": np.arange(n) % u, "blocks": np.arange(n) * u // n,
             "random": rng.integers(0, u, size=n), "first-user": np.zeros(n)}[case.user_index]
    return Request(user=base.user, item=base.item, user_index=index.astype(np.int64),
                   user_ids=tuple(f"fuzz-{case.seed}-u{i}" for i in range(u)))


def _error(stage: str, exc: BaseException) -> dict[str, Any]:
    from mixexport.errors import MixexportError

    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"stage": stage, "type": type(exc).__name__,
            "message": exc.message if isinstance(exc, MixexportError) else str(exc),
            "user_error": isinstance(exc, MixexportError), "traceback": "".join(tb)[-6000:]}


def _checkpoint(case: Case, path: Path) -> Path:
    import torch

    from mixexport.models import create_model, save_checkpoint

    torch.manual_seed(case.seed)
    return save_checkpoint(create_model(case.family, case.config).eval(), path, {"fuzz_case": case.seed})


def score(case: Case, bundle: Path, checkpoint: Path) -> dict[str, Any]:
    """The case's request through the bundle's runtime vs the eager reference (:func:`score_request`)."""
    from mixexport.source import load_source

    source = load_source(checkpoint)
    return score_request(bundle, source, make_request(case, source))


def score_request(bundle: Path, source: Any, request: Any) -> dict[str, Any]:
    """``request`` through the bundle's runtime vs ``source``'s eager model, at the tolerances verify
    gates the bundle at; then the same request again (per-user caches warm) must match exactly."""
    from mixexport.bundle import read_manifest
    from mixexport.runtime import Runtime
    from mixexport.verification.compare import compare_outputs
    from mixexport.verification.run import bundle_tolerances, execution_plan

    manifest = read_manifest(bundle)
    precision, per, default = bundle_tolerances(manifest)
    backend, device, _ = execution_plan(manifest, None, "cpu")  # engines that cannot run here: their ONNX
    with Runtime.open(manifest, backend, device) as rt, Runtime.reference(source) as ref:
        first = rt.score(request)
        results = compare_outputs(first, ref.score(request), per, default)
        again = rt.score(request)
    failures = [r.line() for r in results if not r.passed]
    failures += [f"FAIL {k}: a cached (second) score differs from the first" for k in first
                 if not np.array_equal(first[k], again[k])]
    return {"precision": precision, "outputs": [r.to_json() for r in results], "failures": failures}


#: ``run_case(engines=…)`` → the build target that makes those engines
ENGINE_TARGETS = {"tensorrt-rtx": "trt-rtx", "tensorrt": "trt", "openvino": "openvino"}
#: engines built and run on the CPU (the others are GPU engines, built with --device cuda)
CPU_ENGINES = ("openvino",)


def run_case(case: Case, workdir: str | Path, keep: bool = False, engines: str | None = None) -> dict[str, Any]:
    """Checkpoint → build (verify included) → score the case's request (a user's own program:
    :func:`mixexport.testing.program_fuzz.run_any_case`). With ``engines``
    (``tensorrt-rtx``: no GPU needed; ``openvino``: CPU) the build targets that backend, as a user's would:
    its engines are built, and where they cannot run the ONNX segments are verified and scored.
    ``quantize-int8`` cases build for ONNX Runtime CPU whatever ``engines`` says (int8 compute is
    a CPU target; the result says so under ``engines_skipped``).
    Never raises for a failure of the case: the result says ``passed``, the ``stage`` reached and
    every error; the bundle is deleted unless ``keep`` or the case failed."""
    from mixexport.pipeline import BuildOptions, build

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"bundle-{case.seed}"
    t0 = time.perf_counter()
    result: dict[str, Any] = {"case": case.to_json(), "label": case.label, "passed": False, "errors": []}
    stage = "checkpoint"
    try:
        ckpt = _checkpoint(case, work / f"model-{case.seed}.pt")
        stage = "build"
        if engines and INT8 in case.passes:
            result["engines_skipped"] = "quantize-int8 builds integer GEMMs for ONNX Runtime CPU only"
            engines = None
        target = ({"target": ENGINE_TARGETS[engines], "device": "cpu" if engines in CPU_ENGINES else "cuda"}
                  if engines else {})
        built = build(ckpt, BuildOptions(out=out, passes=case.build_passes, bench=False, metrics=False, force=True,
                                         pass_options=EXT_OPTIONS if EXT in case.build_passes else (), **target))
        result["verify_max_rel"] = built.parity["max_rel"]
        if engines:
            result["engines"] = {s["name"]: {"bytes": s["engine_build"]["bytes"], "seconds": s["engine_build"]["seconds"],
                                             "int8": (s["engine_build"].get("int8") or {}).get("status")}
                                 for s in built.manifest["segments"]}
        stage = "score"
        stage = scored(result, score(case, out, ckpt))
    except Exception as e:  # noqa: BLE001 - the report carries every failure, with its traceback
        result["errors"].append(_error(stage, e))
    return finished(result, stage, t0, out, keep)


def scored(result: dict[str, Any], parity: dict[str, Any]) -> str:
    """Record the score stage's parity (each failure an error) in ``result``; the stage reached."""
    result["score"] = parity
    result["errors"] += [{"stage": "score", "type": "ParityFailure", "message": m, "user_error": False}
                         for m in parity["failures"]]
    result["passed"] = not parity["failures"]
    return "done"


def finished(result: dict[str, Any], stage: str, t0: float, out: Path, keep: bool) -> dict[str, Any]:
    """Close a case's result: the stage reached and the seconds taken; a passing case's bundle is
    deleted unless ``keep``."""
    result["stage"] = stage
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if result["passed"] and not keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def failure_key(result: Mapping[str, Any]) -> tuple[str, str]:
    """What makes two failures "the same" while shrinking: stage and error type."""
    err = (result.get("errors") or [{}])[0]
    return result.get("stage", ""), str(err.get("type", ""))


def shrink(result: Mapping[str, Any], workdir: str | Path, max_runs: int = 40,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Greedy shrink of a failing case: lower one choice index at a time (to 0, then halfway, then by
    one), keeping any change that still fails the same way. Returns the smallest failing result."""
    say = log or (lambda _m: None)
    best = dict(result)
    key = failure_key(best)
    runs = 0
    improved = True
    while improved and runs < max_runs:
        improved = False
        case = Case.from_json(best["case"])
        for name, index in sorted(case.choices.items()):
            for lower in sorted({0, index // 2, index - 1}):
                if lower >= index or runs >= max_runs:
                    continue
                candidate = replay(case, {name: lower})
                if candidate == case:
                    continue
                runs += 1
                res = run_case(candidate, workdir)
                say(f"shrink {runs}: {name} {index}->{lower}: {'fails' if not res['passed'] else 'passes'}")
                if not res["passed"] and failure_key(res) == key:
                    best, improved = res, True
                    break
            if improved:
                break
    best["shrink_runs"] = runs
    return best


def signature(result: Mapping[str, Any]) -> str:
    """A failure's kind: stage, error type and first message line with the numbers masked."""
    err = (result.get("errors") or [{}])[0]
    line = str(err.get("message", "")).strip().splitlines()
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", line[-1] if err.get("type") == "GateFailedError" and line
                  else (line[0] if line else ""))
    return f"{result.get('stage')}: {err.get('type')}: {text[:200]}"


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts per (family, passes); failures grouped by :func:`signature`, each kind with its
    count and the configs that showed it."""
    per: dict[str, dict[str, int]] = {}
    kinds: dict[str, dict[str, Any]] = {}
    for r in results:
        row = per.setdefault(r["label"], {"tried": 0, "passed": 0, "failed": 0})
        row["tried"] += 1
        row["passed" if r["passed"] else "failed"] += 1
        if r["passed"]:
            continue
        kind = kinds.setdefault(signature(r), {"count": 0, "cases": []})
        kind["count"] += 1
        kind["cases"].append({"label": r["label"], "describe": describe(Case.from_json(r["case"])),
                              "case": r["case"], "traceback": r["errors"][0].get("traceback", "")})
    failed = sum(not r["passed"] for r in results)
    return {"tried": len(results), "passed": len(results) - failed, "failed": failed,
            "per_combination": dict(sorted(per.items())), "failure_kinds": kinds}


def describe(case: Case) -> str:
    """One line: the case's passes, request shape and config (schema inlined)."""
    cfg = json.dumps(case.config, separators=(",", ":"))
    seq = f", seq_len {case.seq_len}" if case.seq_len is not None else ""
    tables = ", tables external" if case.tables == "external" else ""
    return (f"{case.label} U={case.users} N={case.candidates} ({case.user_index}{seq}{tables}) seed={case.seed} "
            f"config={cfg}")


"""Fuzzed parity, the CI slice (mixexport.testing.fuzz; the long run is scripts/fuzz_parity.py).

Per (family, passes) combination, one random case — built, verified and scored for real: case k
of seed ``CI_SEED`` for combination k. Plus the minimal configs of the bugs the fuzzer found (each
fixed; kept as regression cases), the samplers' validity (hypothesis, no builds), replay and
failure reporting.

A build is ~3-15 s of mostly single-threaded tracing (torch.export, ONNX export), so the selected
cases run two at a time in worker processes, started when the first of them is needed. The
quantize-only cases of longer and the MoE families are ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixexport.testing.fuzz import (COMBOS, INT8, INT8_COMBOS, KV, PACK, QUANT, QUANT_MIN_WIDTH, SPLIT, Case, Chooser,
                            combinations, describe, generate_cases, make_case, replay, run_case)
from mixexport.models import create_model
from mixexport.models.common import random_feeds
from tests.trt_rtx import require_trt_rtx, trt_rtx_reason
from mixexport.testing.program_fuzz import generate_program_cases, run_any_case
from tests.corpus import fuzz_entries

#: Under pytest-xdist every worker collects every case, and the module's ``results`` fixture submits
#: the ones collected: one group keeps the fuzz tests (and so those builds) on one worker.
pytestmark = pytest.mark.xdist_group("fuzz")

CI_SEED = 0
CI_FORCED = {"layers": 0}  # one layer: build time is mostly per-graph overhead, not model size
SLOW_LABELS = {"longer[quantize-w8a16]", "rankmixer-moe[quantize-w8a16]", "tokenmixer-large[quantize-w8a16]",
               "longer[extract-kv-cache,quantize-int8]", "rankmixer-moe[pack-moe-experts,quantize-int8]",
               "mixformer[quantize-w8a16]", "hyformer[quantize-w8a16]", "hyformer[extract-kv-cache,quantize-int8]"}
WORKERS = max(1, min(2, os.cpu_count() or 1))


def _longer(passes: tuple[str, ...], **forced: int) -> Case:
    """The simplest longer case (every choice at index 0) with ``forced`` choice indices."""
    return replay(Case("longer", passes, 0, {}, 1, 1, "interleaved"), forced)


CI_CASES = generate_cases(len(combinations()), CI_SEED, forced=CI_FORCED)
# Minimal configs of the bugs the fuzzer found (all fixed). Option indices: merge (2, 1, 3, 4), recent
# (2, 1, 3, 4), extra_groups (1, 0, 2, 5), seq_len = merge · (recent + extra_groups); tokenmixer-large
# experts (2, 3, 4).
REGRESSION_CASES = [
    # one merged position (seq_len == merge): torch.export turned the size-1 axis into a constant
    ("longer-one-group", _longer((), merge=0, recent=1, extra_groups=1)),            # merge 2, seq_len 2
    # merge 1, recent 3: the sequence Dim had min 1, below the model's guard seq_len >= recent
    ("longer-merge-1", _longer((), merge=1, recent=2, extra_groups=0)),              # merge 1, seq_len 4
    # merge 1: seq and groups are one symbol; 1·Dim made a second Dim named like the first
    ("kv-merge-1", _longer((KV,), merge=1, recent=1, extra_groups=3)),               # merge 1, seq_len 6
    # the append check cut a 3-position window into 1 + 2: a size-1 axis and below groups >= recent
    ("kv-append-short-window", _longer((KV,))),                                      # merge 2, seq_len 6
    # one position in the model's schema, two in the sample: verify's append check replaced the whole
    # window (nothing kept: a miss, not an append); it now keeps a position
    ("kv-two-positions", _longer((KV,), merge=0, recent=1, extra_groups=1)),        # merge 2, seq_len 2
    # experts=2 is one shared + one routed expert: a one-member ModuleList, its no-op gate slice elided
    ("tml-pack-one-routed", replay(Case("tokenmixer-large", (PACK,), 0, {}, 1, 1, "interleaved"))),
]


# The corpus of users' own architectures (tests/corpus/): cases cycle through its (model, passes,
# precision) entries that verify, each with a random U x N request whose ids span their ranges.
CORPUS_CASES = generate_program_cases(fuzz_entries(), 2, CI_SEED)


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """``run_case`` futures for every case the session selected (slice and known bugs), by case id."""
    wanted: dict[str, Case] = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "results" in getattr(item, "fixturenames", ()):
            wanted[callspec.id] = callspec.params["case"]
    work = tmp_path_factory.mktemp("fuzz")
    engines = None if trt_rtx_reason() else "tensorrt-rtx"  # each case's segments also built by TensorRT-RTX
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield {cid: pool.submit(run_any_case, case, work / f"case-{n}", False, engines)
               for n, (cid, case) in enumerate(wanted.items())}


def _param(case: Case) -> Any:
    return pytest.param(case, id=case.label, marks=[pytest.mark.slow] if case.label in SLOW_LABELS else [])


def _failure_text(case: Case, result: dict[str, Any]) -> str:
    lines = [f"fuzz case failed at {result['stage']}: {describe(case)}"]
    for e in result["errors"]:
        lines.append(f"  [{e['stage']}] {e['type']}: {e['message']}")
        lines.append(e.get("traceback", ""))
    return "\n".join(lines)


@pytest.mark.parametrize("case", [_param(c) for c in CI_CASES])
def test_fuzz_case(case: Case, results: dict[str, Future], request: pytest.FixtureRequest) -> None:
    """build + verify pass, and the case's U × N request matches the eager model at the bundle's
    precision tolerance (twice: the second time from the per-user caches)."""
    result = results[request.node.callspec.id].result()
    assert result["passed"], _failure_text(case, result)
    assert result["stage"] == "done"
    _check_engines(result)
    outputs = result["score"]["outputs"]
    assert outputs and all(o["shape"] == [case.candidates, case.config["tasks"]] for o in outputs)
    if INT8 in case.passes:  # int8 compute, scored at int8 tolerances
        assert result["score"]["precision"] == "int8"


def test_ci_slice_covers_every_combination() -> None:
    assert [(c.family, c.passes) for c in CI_CASES] == combinations()
    assert {f for f, _ in combinations()} == set(COMBOS) == set(INT8_COMBOS)
    assert len({c.seed for c in CI_CASES}) == len(CI_CASES)


def test_generation_is_deterministic_and_replayable() -> None:
    first = generate_cases(40, seed=3)
    assert first == generate_cases(40, seed=3)
    assert first != generate_cases(40, seed=4)
    assert generate_cases(5, seed=3, start=17) == first[17:22]
    for case in first:
        assert replay(case) == case
    smallest = replay(first[0], {name: 0 for name in first[0].choices})
    assert smallest.choices == {name: 0 for name in smallest.choices}


def test_chooser_limit_and_forced() -> None:
    import random

    choose = Chooser(random.Random(0), forced={"a": 5}, limit=2)
    assert choose("a", (10, 20, 30)) == 20          # forced index clipped to the limited options
    assert all(Chooser(random.Random(i), limit=2)("b", (1, 2, 3, 4)) in (1, 2) for i in range(20))
    with pytest.raises(ValueError, match="drawn twice"):
        choose("a", (1, 2))
    with pytest.raises(ValueError, match="no valid option"):
        choose("c", ())


class _HypothesisChooser(Chooser):
    """Choices drawn by hypothesis (shrinking towards index 0, the simplest option)."""

    def __init__(self, data: st.DataObject) -> None:
        super().__init__()
        self.data = data

    def _index(self, name: str, n: int) -> int:
        return self.data.draw(st.integers(0, n - 1), label=name)


@pytest.mark.parametrize("family,passes", combinations(), ids=[f"{f}[{','.join(p) or 'none'}]"
                                                                 for f, p in combinations()])
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_sampled_configs_are_valid(family: str, passes: tuple[str, ...], data: st.DataObject) -> None:
    """Every sampled config passes its Config's validation, the eager model runs on the case's
    request rows, and the pass-specific constraints hold (MoE on for pack, wide norms for w8a16)."""
    case = make_case(family, passes, _HypothesisChooser(data), seed=0)
    model = create_model(family, case.config).eval()   # Config.__post_init__ validates
    schema = model.config.schema
    if case.seq_len is not None:
        merge = getattr(model.config, "merge", 1)   # LONGER merges positions; HyFormer keeps them
        assert case.seq_len % merge == 0 and case.seq_len >= model.config.recent * merge
        schema = dataclasses.replace(schema, seq_len=case.seq_len)
    feeds = {k: torch.from_numpy(v) for k, v in random_feeds(schema, case.candidates, seed=1).items()}
    with torch.inference_mode():
        out = model(**feeds)
    assert tuple(out.shape) == (case.candidates, case.config["tasks"]) and bool(torch.isfinite(out).all())
    if PACK in passes:
        assert case.config.get("moe", True)
    if SPLIT in passes and family == "mixformer":
        assert case.config["ui"]  # split-user-item needs UI-MixFormer's user heads
    if QUANT in passes or INT8 in passes:
        assert case.config["dim"] >= QUANT_MIN_WIDTH
        if family == "tokenmixer-large" and case.config["moe"] and case.config["top_k"] < case.config["experts"]:
            assert case.config["down_init"] == 0.01   # top-k routing: see sample_tokenmixer_large
    assert 1 <= case.users and 1 <= case.candidates


def test_run_case_reports_a_failing_case(tmp_path: Path) -> None:
    """A pass that does not apply (split-user-item on rankmixer) is a failed case with the stage and
    the precondition's message, not an exception and not a pass."""
    case = replay(Case("rankmixer", ("split-user-item",), 0, {}, 1, 1, "interleaved"))
    result = run_case(case, tmp_path)
    assert not result["passed"] and result["stage"] == "build"
    (err,) = result["errors"]
    assert err["type"] == "PreconditionError" and "split-user-item needs user-only computation" in err["message"]
    assert not any(p.name.startswith("bundle-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("case", [pytest.param(c, id=b) for b, c in REGRESSION_CASES])
def test_regression_case(case: Case, results: dict[str, Future], request: pytest.FixtureRequest) -> None:
    """The smallest configs that once failed now build, verify and score like any other case."""
    result = results[request.node.callspec.id].result()
    assert result["passed"], _failure_text(case, result)
    _check_engines(result)


def _check_engines(result: dict[str, Any]) -> None:
    """With TensorRT-RTX installed (always in CI), every segment of the case built an engine (int8
    compute cases: none, ONNX Runtime CPU is their target)."""
    if INT8 in result["case"]["passes"]:
        assert "engines" not in result
        return
    require_trt_rtx()
    assert result["engines"] and all(e["bytes"] > 0 for e in result["engines"].values()), result["engines"]
    assert all(e["int8"] in (None, "PASS", "inconclusive") for e in result["engines"].values())


def test_request_modes(tmp_path: Path) -> None:
    from mixexport.testing.fuzz import USER_INDEX_MODES, make_request
    from mixexport.models import save_checkpoint
    from mixexport.source import load_source

    source = load_source(save_checkpoint(create_model("rankmixer"), tmp_path / "m.pt"))
    seen = set()
    for mode in USER_INDEX_MODES:
        case = Case("rankmixer", (), 3, {}, users=3, candidates=10, user_index=mode)
        req = make_request(case, source)
        assert req.user_index.dtype == np.int64 and req.user_index.shape == (10,)
        assert 0 <= req.user_index.min() and req.user_index.max() < 3 and len(req.user_ids) == 3
        seen.add(tuple(req.user_index))
    assert len(seen) == len(USER_INDEX_MODES)  # four different assignments of candidates to users


@pytest.mark.parametrize("case", [pytest.param(c, id=f"corpus:{c.label}") for c in CORPUS_CASES])
def test_corpus_program_case(case: Any, results: dict[str, Future], request: pytest.FixtureRequest) -> None:
    """A user's own program from the corpus builds, verifies and scores its request like eager."""
    result = results[request.node.callspec.id].result()
    assert result["passed"], f"{case.describe()}: {result['errors']}"
    assert result["stage"] == "done" and result["score"]["outputs"]

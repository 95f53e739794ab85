"""The corpus of third-party architectures through the real CLI (issue 27, item 7): every case is
inspected, built for ONNX Runtime with a representative subset of serving passes and precisions,
verified, and scored on a request whose ids span their whole ranges (padding id 0 and the last id
included) against the eager program. Where a pass does not apply, the refusal is asserted: exit 2,
one ``error:`` line and one ``hint:`` line holding the expected fragment, no traceback, no bundle.

Goal of the issue: 0 exit-4s, 0 parity checks on constant ids only. Outcomes that need another
item of issue 27 first are strict xfails naming the item (``Outcome.awaits``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from mixexport.testing.program_fuzz import generate_program_cases, ranged_request, score_program
from tests.cli_helpers import CliResult, run_cli
from tests.corpus import BY_NAME, CASES, Case, Outcome, build_args, fuzz_entries, save_case

pytestmark = pytest.mark.xdist_group("corpus")  # one worker builds the corpus' programs once


class Corpus:
    """Each case's ``.pt2`` saved once, and each (case, combination) built once, on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.programs: dict[str, Path] = {}
        self.builds: dict[tuple[str, str], tuple[CliResult, Path]] = {}

    def program(self, case: Case) -> Path:
        if case.name not in self.programs:
            self.programs[case.name] = save_case(case, self.root / f"{case.name}.pt2")
        return self.programs[case.name]

    def build(self, case: Case, combo: str) -> tuple[CliResult, Path]:
        if (case.name, combo) not in self.builds:
            out = self.root / f"{case.name}-{combo}"
            r = run_cli("build", str(self.program(case)), "--out", str(out), "--no-bench", *build_args(combo))
            self.builds[case.name, combo] = (r, out)
        return self.builds[case.name, combo]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    yield Corpus(tmp_path_factory.mktemp("corpus"))


def _awaiting(awaits: int | None) -> list[Any]:
    return [] if awaits is None else [pytest.mark.xfail(strict=True, reason=f"awaits issue 27 item {awaits}")]


def _combos() -> list[Any]:
    return [pytest.param(case, combo, outcome, id=f"{case.name}-{combo}", marks=_awaiting(outcome.awaits))
            for case in CASES for combo, outcome in case.expect.items()]


def assert_one_line_refusal(r: CliResult, contains: str) -> None:
    """Exit 2, no traceback, exactly one ``error:`` and one ``hint:`` line, ``contains`` in them."""
    lines = [line for line in r.err.splitlines() if line.startswith(("error:", "hint:"))]
    assert r.code == 2, f"expected a refusal (exit 2), found exit {r.code}:\n{r.err[-3000:]}"
    assert "Traceback" not in r.err, r.err[-3000:]
    assert [line.split(":", 1)[0] for line in lines] == ["error", "hint"], r.err[-3000:]
    assert contains in "\n".join(lines), f"expected {contains!r} in the refusal:\n" + "\n".join(lines)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=_awaiting(c.inspect.awaits)) for c in CASES])
def test_inspect_finds_every_id_range(case: Case, corpus: Corpus) -> None:
    """``inspect`` reads the program, gives every input a role, and knows every id input's range (or,
    for a model that cannot serve, refuses in one line)."""
    r = run_cli("inspect", str(corpus.program(case)), "--json", "--no-timing")
    if not case.inspect.verifies:
        assert_one_line_refusal(r, case.inspect.contains)
        return
    assert r.code == 0, r.err[-3000:]
    info = json.loads(r.out)
    inputs = {s["name"]: s for s in info["inputs"]}
    assert set(case.ids) <= set(inputs) and all(s["role"] in ("user", "item", "sequence") for s in inputs.values())
    for name in case.ids:
        spec = inputs[name]
        assert spec.get("vocab") is not None or spec.get("ids"), \
            f"{case.name}: no id range recorded for {name}; notes: {info['notes']}"
        if case.expected_vocab(name) is not None:  # else hashed: an open range (any id >= 0) is recorded
            assert spec.get("vocab") == case.expected_vocab(name), (name, spec)
    assert not [n for n in info["notes"] if n.startswith("warning:")], info["notes"]


@pytest.mark.parametrize("case,combo,outcome", _combos())
def test_build_verify_or_refuse(case: Case, combo: str, outcome: Outcome, corpus: Corpus) -> None:
    """The combination either builds a bundle that verifies and scores a request with ids across their
    ranges like the eager program, or is refused in one line with the expected hint."""
    r, out = corpus.build(case, combo)
    if not outcome.verifies:
        assert_one_line_refusal(r, outcome.contains)
        assert not out.exists()
        return
    assert r.code == 0, r.err[-3000:]
    v = run_cli("verify", str(out))
    assert v.code == 0, v.err[-3000:]
    program = corpus.program(case)
    from mixexport.source import load_source

    seq_len = case.seq_lens[-1] if case.seq_lens else None  # not the export's length: the axis is dynamic
    request = ranged_request(load_source(program), case.ids, 2, 7, seed=5, seq_len=seq_len)
    parity = score_program(out, program, request)
    assert not parity["failures"], parity["failures"]
    _assert_bad_ids_refused(case, out, request)


def _assert_bad_ids_refused(case: Case, bundle: Path, request: Any) -> None:
    """An id below 0 or at the table's size is refused before anything runs, naming the input (never
    wrapped to another row). Hashed inputs (``vocab`` None) take any id, so they are not probed."""
    from mixexport.errors import BadInputError
    from mixexport.runtime import Runtime
    from mixexport.specs import Request

    name = next((n for n in case.ids if case.expected_vocab(n) is not None), None)
    if name is None:
        return
    with Runtime.open(bundle) as rt:
        for bad in (-1, case.ids[name]):
            side = "user" if name in request.user else "item"
            feeds = {k: v.copy() for k, v in getattr(request, side).items()}
            feeds[name].reshape(-1)[0] = bad
            req = Request(user=feeds if side == "user" else request.user,
                          item=feeds if side == "item" else request.item, user_index=request.user_index)
            with pytest.raises(BadInputError) as e:
                rt.score(req)
            assert name in e.value.message and str(bad) in e.value.message, e.value.message


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=_awaiting(c.expect["fp32"].awaits))
                                  for c in CASES if c.expect["fp32"].verifies])
def test_parity_checks_see_varied_ids(case: Case, corpus: Corpus) -> None:
    """The bundle's sample request (what build and verify check parity on) holds more than one id in
    every id input, and more than the padding id alone: no parity check on constant ids only."""
    r, out = corpus.build(case, "fp32")
    assert r.code == 0, r.err[-3000:]
    with np.load(out / "inputs" / "sample.npz", allow_pickle=False) as sample:
        for key in sample.files:
            name = key.split("/", 1)[-1]
            if name in case.ids:
                ids = np.unique(sample[key])
                assert len(ids) > 1, f"{case.name}: {key} holds only id {ids.tolist()}"
                if name in case.padding:
                    assert (ids != case.padding[name]).any()


def test_every_case_states_an_fp32_outcome_and_refusals_carry_a_hint() -> None:
    assert len(BY_NAME) == len(CASES)
    for case in CASES:
        assert "fp32" in case.expect, case.name
        assert all(o.verifies or o.contains for o in case.expect.values()), case.name


def test_program_fuzz_samples_the_corpus() -> None:
    """The parity fuzz draws from the corpus (tests/test_fuzz.py runs its CI slice of these draws):
    the cases cycle through every entry that verifies, and replay from (seed, index)."""
    entries = fuzz_entries()
    cases = generate_program_cases(entries, len(entries), seed=0)
    assert cases == generate_program_cases(entries, len(entries), seed=0)
    assert [c.entry.label for c in cases] == [e.label for e in entries]
    assert cases[1:3] == generate_program_cases(entries, 2, seed=0, start=1)
    assert all(c.seq_len in (None, *c.entry.seq_lens) and 1 <= c.users and 1 <= c.candidates for c in cases)

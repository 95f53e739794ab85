"""What every corpus case shares: the case record, expected outcomes, and saving a case as the
``.pt2`` a user would hand to ``mixexport``.

A corpus module is one third-party architecture written by us (small, tiny dimensions), in the
style of the library it stands for (torch-rechub, deepctr-torch, the SASRec/BST papers): ids cast
with ``.long()``, padding id 0, tuple or dict outputs, a bare ``.squeeze()``. Its ``build``
function returns the eager module, example inputs by name and the ``dynamic_shapes`` the user
would export with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

#: What a build of a case is expected to do, per combination (see ``COMBOS``).
VERIFIES = "verifies"


@dataclass(frozen=True)
class Outcome:
    """``verifies``: build, verify and a request with ids across their ranges all pass; otherwise
    a one-line refusal (exit 2) whose message or hint contains ``contains``. ``awaits``: the issue 27
    item whose fix makes this outcome true (today's behaviour differs; the test is a strict xfail)."""

    result: str = VERIFIES
    contains: str = ""
    awaits: int | None = None

    @property
    def verifies(self) -> bool:
        return self.result == VERIFIES


def verifies(awaits: int | None = None) -> Outcome:
    return Outcome(VERIFIES, "", awaits)


def refused(contains: str, awaits: int | None = None) -> Outcome:
    return Outcome("refused", contains, awaits)


#: Per combination name: the build's passes and its precision (the serving passes and precisions).
COMBOS: dict[str, tuple[tuple[str, ...], str]] = {
    "fp32": ((), "fp32"),
    "split": (("split-user-item",), "fp32"),
    "kv": (("extract-kv-cache",), "fp32"),
    "pack": (("pack-moe-experts",), "fp32"),
    "w8a16": (("quantize-w8a16",), "fp32"),
    "split+w8a16": (("split-user-item", "quantize-w8a16"), "fp32"),
    "fp16": ((), "fp16"),
    "int8": ((), "int8"),
    "precision-w8a16": ((), "w8a16"),
}


def build_args(combo: str) -> tuple[str, ...]:
    """``mixexport build`` arguments of a combination."""
    passes, precision = COMBOS[combo]
    args = ("--passes", ",".join(passes)) if passes else ("--no-passes",)
    return args + (("--precision", precision) if precision != "fp32" else ())


@dataclass(frozen=True)
class Case:
    """One corpus model.

    ``ids``: every integer input and the exclusive upper bound of the ids it takes (its table's rows,
    or for a hashed input the raw id space); ``vocab``: what the manifest should record for it
    (``None``: a hashed input, whose range only has to be recorded, not equal its table).
    ``expect``: the outcome per combination the corpus test runs (a representative subset).
    ``inspect``: what ``mixexport inspect`` does (``verifies``: it reads the program and finds every
    id input's range).
    """

    name: str
    build: Callable[[], tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]]
    ids: Mapping[str, int]
    expect: Mapping[str, Outcome]
    vocab: Mapping[str, int | None] = field(default_factory=dict)
    padding: Mapping[str, int] = field(default_factory=dict)  # id that masks a position (e.g. 0)
    seq_lens: tuple[int, ...] = ()                            # request sequence lengths (dynamic seq axis)
    inspect: Outcome = Outcome()  # verifies: inspect reads it and finds every id range; or its refusal
    note: str = ""

    def expected_vocab(self, name: str) -> int | None:
        return self.vocab.get(name, self.ids[name])


def batch_dims(inputs: Mapping[str, torch.Tensor], extra: Mapping[str, Mapping[int, Any]] | None = None
               ) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` with one shared ``batch`` Dim on axis 0 of every input (plus ``extra``)."""
    batch = torch.export.Dim("batch")
    out = {name: {0: batch} for name in inputs}
    for name, axes in (extra or {}).items():
        out[name].update(axes)
    return out


def save_case(case: Case, path: Path, seed: int = 0) -> Path:
    """Build the case's module (seeded), ``torch.export`` it as its user would and ``torch.export.save``."""
    torch.manual_seed(seed)
    model, inputs, dynamic = case.build()
    ep = torch.export.export(model.eval(), (), kwargs=dict(inputs), dynamic_shapes=dynamic, strict=False)
    torch.export.save(ep, path)
    return path


def program_entry(case: Case, combo: str) -> Any:
    """The case built with ``combo``, as an entry of the program fuzz
    (:class:`mixexport.testing.program_fuzz.ProgramEntry`)."""
    from mixexport.testing.program_fuzz import ProgramEntry

    passes, precision = COMBOS[combo]
    return ProgramEntry(f"corpus-{case.name}", functools.partial(_save, case), passes, precision, dict(case.ids),
                        case.seq_lens)


def _save(case: Case, path: Path, seed: int) -> Path:
    return save_case(case, path, seed)

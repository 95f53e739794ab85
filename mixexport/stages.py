"""The bundle between stages, as a build sees it: the program-stage bundle it starts from, the ONNX
export of every segment, a runtime over in-memory segments, and the *stage ledger* (the error of
the bundle-so-far against the eager model after each stage). :mod:`mixexport.pipeline` orchestrates
the stages; this module holds what each of them needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixexport.bundle import Bundle, Segment
from mixexport.export import PROTOBUF_LIMIT, fits_protobuf, save_onnx, to_onnx
from mixexport.passes import PassInfo
from mixexport.runtime import Runtime
from mixexport.source import Source, export_program
from mixexport.specs import Request
from mixexport.verification.compare import compare_outputs, gate_precision, resolve_tolerances

Progress = Callable[[str], None]


def initial_bundle(source: Source) -> Bundle:
    """The program-stage bundle every build starts from: one full segment, dynamic batch."""
    return Bundle(source=source, stage="program",
                  segments=(Segment("model", "full", source.inputs, source.outputs, program=export_program(source)),))


def to_onnx_stage(bundle: Bundle, request: Request) -> Bundle:
    """Export every program segment to ONNX, tracing with the feeds each sees for ``request``."""
    feeds: dict[str, dict[str, np.ndarray]] = {}
    with stage_runtime(bundle, trace=feeds) as rt:
        rt.score(request)
    segments = tuple(dataclasses.replace(s, onnx=to_onnx(s.program, s.inputs, s.outputs, feeds[s.name]))
                     for s in bundle.segments)
    return bundle.replace(stage="onnx", segments=segments)


def stage_runtime(bundle: Bundle, trace: dict[str, dict[str, np.ndarray]] | None = None) -> Runtime:
    """A runtime over the in-memory segments: torch for programs, ONNX Runtime for ONNX."""
    from mixexport.backends.eager import ProgramSession
    from mixexport.backends.onnxruntime import OnnxRuntimeBackend
    from mixexport.bundle import SegmentEntry

    sessions: dict[str, Any] = {}
    entries = []
    for seg in bundle.segments:
        names = [s.name for s in seg.outputs]
        if bundle.stage == "program":
            sessions[seg.name] = ProgramSession(seg.program, names)
        else:
            sessions[seg.name] = open_in_memory(OnnxRuntimeBackend(), seg.onnx)
        entries.append(SegmentEntry(seg.name, seg.role, "", "memory", seg.inputs, seg.outputs))
    from mixexport.tables.stores.memory import memory_lookups

    rt = Runtime(bundle.source.inputs, bundle.source.outputs, tuple(entries), sessions,
                 caches=[c.to_json() for c in bundle.caches], multiples=bundle.source.multiples,
                 minimums=bundle.source.minimums, tables=memory_lookups(bundle.tables))
    rt.trace = trace
    return rt


def open_in_memory(backend: Any, model: Any, limit: int = PROTOBUF_LIMIT) -> Any:
    """An ONNX Runtime session on an in-memory model. Past protobuf's 2 GB the model cannot be
    serialized in one piece: a copy is saved with external data to a temporary directory and opened
    from there (ONNX Runtime has read the weights when the session exists; the directory is removed
    then). The bundle's own model is left as it is."""
    import tempfile

    import onnx

    if fits_protobuf(model, limit):
        return backend.open_bytes(model.SerializeToString())
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="mixexport-stage-") as tmp:
        path = Path(tmp) / "segment.onnx"
        onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="segment.onnx.data", size_threshold=1024)
        del copy
        return backend.open_file(path)


def dump_bundle(bundle: Bundle, path: Path, say: Progress) -> None:
    """``--dump-after``: the intermediate segments (``.pt2`` programs or ``.onnx``) for inspection."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    for seg in bundle.segments:
        if bundle.stage == "program":
            torch.export.save(seg.program, path / f"{seg.name}.pt2")
        else:
            save_onnx(seg.onnx, path / f"{seg.name}.onnx")
    say(f"dumped the {bundle.stage}-stage segments to {path}")


def ledger_entry(stage: str, bundle: Bundle, request: Request, expected: dict[str, np.ndarray],
                 tolerances: Any) -> dict[str, Any]:
    from mixexport.errors import EnvironmentUnavailableError

    try:
        with stage_runtime(bundle) as rt:
            res = compare_outputs(rt.score(request), expected, *tolerances)
    except EnvironmentUnavailableError as e:  # e.g. a bf16 ONNX, which ORT's CPU provider cannot run
        return {"stage": stage, "outputs": [], "skipped": e.message}
    return {"stage": stage, "outputs": [r.to_json() for r in res]}


@dataclass
class BuildPlan:
    """What a build has settled before it exports anything, and the stage ledger it fills."""

    options: Any                      # mixexport.pipeline.BuildOptions
    say: Progress
    backend: Any
    source: Source
    passes: list[PassInfo]
    pass_options: dict[str, Any]
    request: Request                  # the sample request: ledger, ONNX export, inputs/sample.npz
    expected: dict[str, np.ndarray]   # the eager model's outputs for it
    ledger: list[dict[str, Any]] = field(default_factory=list)

    def record(self, stage: str, bundle: Bundle) -> None:
        """Ledger row: error vs eager after ``stage``, at the tolerances of the bundle's precision."""
        held = gate_precision(bundle.precision, [t.entry.dtype for t in bundle.tables])
        tol = resolve_tolerances([s.name for s in self.source.outputs], held, self.options.atol, self.options.rtol)
        self.ledger.append(ledger_entry(stage, bundle, self.request, self.expected, tol))

    def dump(self, stage: str, bundle: Bundle) -> None:
        """``--dump-after STAGE``: the intermediate segments next to ``--out``."""
        if self.options.dump_after == stage:
            dump_bundle(bundle, Path(f"{self.options.out}.after-{stage}"), self.say)

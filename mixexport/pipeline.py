"""The build pipeline: load → torch.export (dynamic batch) → program passes → ONNX per segment →
ONNX passes → backend artifacts → verify + bench on the finished directory → atomic commit.

The pass order is the tuple :data:`mixexport.passes.order.ORDER`; a family's ``DEFAULT_PASSES``
picks which of them run when ``--passes`` is not given. :func:`run_pass` enforces the pass contract
(requires → run → ensures, see :mod:`mixexport.passes`). After every stage the *stage ledger*
records the error of the bundle-so-far against the eager model on the sample request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixexport.bundle import SCHEMA_VERSION, Bundle, BundleWriter, PassRecord, Segment, library_versions
from mixexport.errors import BadInputError, GateFailedError, MixexportError, PassError
from mixexport.export import (EXTERNAL_DATA_THRESHOLD, PROTOBUF_LIMIT, fits_protobuf, op_histogram, save_onnx, to_onnx,
                              weight_bytes)
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.options import build_options, check_specs, split_specs
from mixexport.passes.order import ORDER, pass_by_name
from mixexport.precision import PASS_PRECISIONS
from mixexport.runtime import Runtime
from mixexport.source import Source, export_program, load_source
from mixexport.specs import Request
from mixexport.verification.compare import compare_outputs, resolve_tolerances
from mixexport.verification.latency import DEFAULT_CANDIDATES

log = logging.getLogger(__name__)

#: --target → the backend that runs the bundle's segments.
TARGETS = {"onnx": "onnxruntime", "aoti": "aoti", "trt": "tensorrt", "trt-rtx": "tensorrt-rtx", "openvino": "openvino"}
SAMPLE_USERS, SAMPLE_CANDIDATES = 2, 16
Progress = Callable[[str], None]


def parse_pass_options(specs: tuple[str, ...], passes: list[PassInfo],
                       defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``--option pass-name.field=value`` → the options of every pass in ``passes``, validated at
    construction (:mod:`mixexport.passes.options`). Fields not given take ``defaults`` (a target's
    choices, e.g. TensorRT's int8 embedding form), else the dataclass's."""
    values = split_specs(specs)
    out = {p.name: build_options(p.name, values.pop(p.name, {}), (defaults or {}).get(p.name)) for p in passes}
    if values:
        raise BadInputError(f"--option given for passes that do not run: {sorted(values)}",
                            "add them to --passes or drop the option")
    return out


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    target: str = "onnx"
    device: str = "cpu"
    passes: tuple[str, ...] | None = None      # None: the family's defaults
    pass_options: tuple[str, ...] = ()
    force: bool = False
    roles: dict[str, str] = field(default_factory=dict)
    bench: bool = True
    bench_candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    bench_budget_s: float = 0.5
    metrics: bool = True
    data: Path | None = None
    atol: dict[str, float] = field(default_factory=dict)
    rtol: dict[str, float] = field(default_factory=dict)
    keep_failed: bool = False
    dump_after: str | None = None
    external_threshold: int = EXTERNAL_DATA_THRESHOLD
    precision: str = "fp32"                    # fp32 | fp16 | bf16: cast at export; int8: quantize-int8 pass
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # TensorRT profiles per axis
    version_compatible: bool = False           # TensorRT: BuilderFlag.VERSION_COMPATIBLE
    arch: tuple[str, ...] = ()                 # TensorRT-RTX: compute capabilities to build for


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    parity: dict[str, Any]
    latency: dict[str, Any] | None
    seconds: float


def select_passes(source: Source, names: tuple[str, ...] | None) -> list[PassInfo]:
    chosen = [pass_by_name(n) for n in (source.default_passes if names is None else names)]
    dup = sorted({p.name for p in chosen if chosen.count(p) > 1})
    if dup:
        raise BadInputError(f"passes listed twice: {dup}", "list each pass once")
    return sorted(chosen, key=ORDER.index)  # program stage before ONNX stage, in pipeline order


def run_pass(info: PassInfo, bundle: Bundle, options: Any, done: list[str]) -> PassResult:
    """Run one pass under its contract (as onnx-ir's ``PassBase.__call__``): the stage must match,
    then ``requires(bundle)`` → ``run(bundle, options)`` → ``ensures(bundle, result, options)``, each
    once. What ``ensures`` measured is added to the result's report.

    :class:`~mixexport.errors.PreconditionError` (exit 2), :class:`~mixexport.errors.PostconditionError`
    (exit 1) and other :class:`~mixexport.errors.MixexportError` pass through; any other exception, or
    a result that is not a :class:`PassResult` at the pass's stage, becomes a
    :class:`~mixexport.errors.PassError` naming the pass and ``done``, the passes that ran before it.
    """
    if bundle.stage != info.stage:
        after = f" (after {', '.join(done)})" if done else ""
        raise BadInputError(f"pass {info.name} works on the {info.stage} stage, the bundle is at "
                            f"{bundle.stage}{after}", "reorder --passes")
    try:
        if info.requires is not None:
            info.requires(bundle)
        result = info.run(bundle, options)
        if not isinstance(result, PassResult) or result.bundle.stage != info.stage:
            found = (f"a bundle at the {result.bundle.stage} stage" if isinstance(result, PassResult)
                     else type(result).__name__)
            raise PassError(info.name, done, f"returned {found}, expected a PassResult at the {info.stage} stage")
        measured = info.ensures(bundle, result.bundle, options) if info.ensures is not None else None
    except (MixexportError, PassError):
        raise
    except Exception as e:  # noqa: BLE001 - a bug in the pass: say which, keep the traceback
        raise PassError(info.name, done, f"{type(e).__name__}: {e}") from e
    if measured:
        result = PassResult(result.bundle, {**result.report, **measured})
    return result


def _ledger_entry(stage: str, bundle: Bundle, request: Request, expected: dict[str, np.ndarray],
                  tolerances: Any) -> dict[str, Any]:
    from mixexport.errors import EnvironmentUnavailableError

    try:
        with stage_runtime(bundle) as rt:
            res = compare_outputs(rt.score(request), expected, *tolerances)
    except EnvironmentUnavailableError as e:  # e.g. a bf16 ONNX, which ORT's CPU provider cannot run
        return {"stage": stage, "outputs": [], "skipped": e.message}
    return {"stage": stage, "outputs": [r.to_json() for r in res]}


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


def to_onnx_stage(bundle: Bundle, request: Request) -> Bundle:
    """Export every program segment to ONNX, tracing with the feeds each sees for ``request``."""
    feeds: dict[str, dict[str, np.ndarray]] = {}
    with stage_runtime(bundle, trace=feeds) as rt:
        rt.score(request)
    segments = tuple(dataclasses.replace(s, onnx=to_onnx(s.program, s.inputs, s.outputs, feeds[s.name]))
                     for s in bundle.segments)
    return bundle.replace(stage="onnx", segments=segments)


def initial_bundle(source: Source) -> Bundle:
    """The program-stage bundle every build starts from: one full segment, dynamic batch."""
    return Bundle(source=source, stage="program",
                  segments=(Segment("model", "full", source.inputs, source.outputs, program=export_program(source)),))


def preconditions(source: Source) -> dict[str, str | None]:
    """For every pass: None if it applies to ``source``, else the precondition's message."""
    from mixexport.errors import PreconditionError

    out: dict[str, str | None] = {}
    stages: dict[str, Bundle] = {}
    for info in ORDER:
        if info.requires is None:
            out[info.name] = None
            continue
        if info.stage not in stages:
            b = stages.get("program") or initial_bundle(source)
            stages["program"] = b
            if info.stage == "onnx":
                stages["onnx"] = to_onnx_stage(b, source.example_request(SAMPLE_USERS, SAMPLE_CANDIDATES))
        try:
            info.requires(stages[info.stage])
            out[info.name] = None
        except PreconditionError as e:
            out[info.name] = e.message
    return out


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


def build(checkpoint: str | Path, options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build a bundle at ``options.out``; nothing is left there unless the build succeeds.

    The steps, in order: load (every input checked, the model loaded, before any export) → export
    (torch.export) → run passes (the ONNX export where the program stage ends) → write segments
    (ONNX files, backend artifacts, manifest) → verify → bench → write reports → commit (the parity
    gate, then the atomic rename).
    """
    t0 = time.perf_counter()
    plan = _load(checkpoint, options, progress or (lambda _msg: None))
    bundle = _run_passes(plan, _export(plan))
    with BundleWriter(Path(options.out), options.force) as writer:
        manifest = _write_segments(plan, bundle, writer)
        parity = _verify(plan, writer)
        latency = _bench(plan, writer, parity)
        _write_reports(plan, bundle, writer, parity, latency)
        out = _commit(plan, bundle, writer, manifest, parity)
    return BuildResult(out=out, manifest=manifest, parity=parity, latency=latency,
                       seconds=time.perf_counter() - t0)


@dataclass
class _Plan:
    """What a build has settled before it exports anything, and the stage ledger it fills."""

    options: BuildOptions
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
        tol = resolve_tolerances([s.name for s in self.source.outputs], bundle.precision, self.options.atol,
                                 self.options.rtol)
        self.ledger.append(_ledger_entry(stage, bundle, self.request, self.expected, tol))

    def dump(self, stage: str, bundle: Bundle) -> None:
        """``--dump-after STAGE``: the intermediate segments next to ``--out``."""
        if self.options.dump_after == stage:
            dump_bundle(bundle, Path(f"{self.options.out}.after-{stage}"), self.say)


def _load(checkpoint: str | Path, options: BuildOptions, say: Progress) -> _Plan:
    """Refuse what cannot be built (target, backend, output directory, pass options, passes for the
    target), load the model, choose its passes and score the sample request eagerly."""
    from mixexport.backends import get_backend
    from mixexport.bundle import check_out_dir

    if options.target not in TARGETS:
        raise BadInputError(f"unknown --target {options.target!r}; known: {', '.join(TARGETS)}", "e.g. --target onnx")
    backend = get_backend(TARGETS[options.target], options.device, for_build=True,
                          settings={"shapes": options.shapes, "version_compatible": options.version_compatible,
                                    "arch": options.arch})
    _check_precision_target(options)
    if hasattr(backend, "for_precision"):  # OpenVINO: the precision is a compile hint (bf16 refused without bf16 GEMMs)
        backend = backend.for_precision(options.precision)
    check_out_dir(Path(options.out), options.force, {"checkpoint": checkpoint, "--data": options.data})
    check_specs(options.pass_options)  # a misspelled --option fails before the model loads
    say("loading model")
    source = load_source(checkpoint, options.roles)
    passes = select_passes(source, _with_precision_pass(source, options, hasattr(backend, "for_precision")))
    if options.dump_after not in (None, "export", *(p.name for p in passes)):
        raise BadInputError(f"--dump-after {options.dump_after!r}: not a pass of this build",
                            f"choose one of {['export', *(p.name for p in passes)]}")
    pass_options = parse_pass_options(options.pass_options, passes, getattr(backend, "PASS_DEFAULTS", None))
    if getattr(backend, "consumes", "onnx") == "program":  # AOTI compiles the program, not the ONNX
        from mixexport.backends.aoti import refuse_onnx_stage_passes

        refuse_onnx_stage_passes([p.name for p in passes], options.target)
    request = source.example_request(SAMPLE_USERS, SAMPLE_CANDIDATES, seed=0)
    with Runtime.reference(source) as reference:
        expected = reference.score(request)
    return _Plan(options, say, backend, source, passes, pass_options, request, expected)


def _with_precision_pass(source: Source, options: BuildOptions, by_engine: bool = False) -> tuple[str, ...]:
    """The passes asked for (or the family's defaults), plus ``quantize-int8`` for ``--precision int8``
    (not when the backend quantizes itself, ``by_engine``: OpenVINO)."""
    names = tuple(source.default_passes if options.passes is None else options.passes)
    extra = None if by_engine else PASS_PRECISIONS.get(options.precision)
    return names + (extra,) if extra and extra not in names else names


def _check_precision_target(options: BuildOptions) -> None:
    if options.target == "openvino":  # its backend's for_precision says which precisions it compiles
        return
    if options.precision in PASS_PRECISIONS and (options.target != "onnx" or options.device != "cpu"):
        raise BadInputError(f"--precision {options.precision} builds integer GEMMs for ONNX Runtime on CPU; "
                            f"found --target {options.target} --device {options.device}",
                            "use --target onnx --device cpu, or --passes quantize-w8a16 (int8 weights) "
                            "for the other targets")


def _export(plan: _Plan) -> Bundle:
    """torch.export with a dynamic batch axis, cast to ``--precision``: the first ledger row."""
    from mixexport.precision import cast_bundle

    plan.say("torch.export (dynamic batch)")
    bundle = cast_bundle(initial_bundle(plan.source), plan.options.precision,
                         by_hint=hasattr(plan.backend, "for_precision"))
    plan.record("torch.export", bundle)
    return bundle


def _run_passes(plan: _Plan, bundle: Bundle) -> Bundle:
    """Every chosen pass under its contract (:func:`run_pass`), in pipeline order, each recorded in
    the bundle and the ledger; the ONNX export happens where the program stage ends."""
    done: list[str] = []
    for info in plan.passes:
        if info.stage == "onnx" and bundle.stage == "program":
            bundle = _to_onnx(plan, bundle)
        plan.say(f"pass {info.name}")
        options = plan.pass_options[info.name]
        result = run_pass(info, bundle, options, done)
        bundle = result.bundle.replace(passes=bundle.passes + (PassRecord(
            info.name, dataclasses.asdict(options), result.report),))
        done.append(info.name)
        plan.record(f"pass {info.name}", bundle)
        plan.dump(info.name, bundle)
    return _to_onnx(plan, bundle) if bundle.stage == "program" else bundle


def _to_onnx(plan: _Plan, bundle: Bundle) -> Bundle:
    plan.say("ONNX export (opset 21)")
    bundle = to_onnx_stage(bundle, plan.request)
    plan.record("onnx export", bundle)
    plan.dump("export", bundle)
    return bundle


def _write_segments(plan: _Plan, bundle: Bundle, writer: BundleWriter) -> dict[str, Any]:
    """The ONNX segments, the backend's artifacts (engines, AOTI packages), the sample request and
    the manifest (the files' sha256 are added at commit)."""
    options, backend, source = plan.options, plan.backend, plan.source
    plan.say("writing bundle")
    tables = _write_tables(plan, bundle, writer)
    seg_json = []
    for seg in bundle.segments:
        files = save_onnx(seg.onnx, writer.path(f"segments/{seg.name}.onnx"), options.external_threshold)
        seg_json.append({**seg.to_json(), "file": f"segments/{seg.name}.onnx",
                         "data_files": [f"segments/{f.name}" for f in files[1:]],
                         "backend": backend.name, "engines": {},
                         "session_options": backend.session_options(),
                         "ops": op_histogram(seg.onnx), "weight_bytes": weight_bytes(seg.onnx),
                         **({"tables_version": tables["version"]} if tables else {})})
    if getattr(backend, "needs_calibration", False):  # OpenVINO int8: ranges from the float segments' feeds
        from mixexport.backends.openvino_int8 import calibration_feeds

        plan.say("int8: recording calibration feeds of every segment")
        backend.calibration = calibration_feeds(bundle, stage_runtime)
    engines = backend.compile(bundle, writer, plan.say)
    for entry in seg_json:
        entry["engines"] = engines.get(entry["name"], {})
        report = getattr(backend, "engine_reports", {}).get(entry["name"])
        if report:  # TensorRT: library, version, archs, profile, seconds, bytes, warnings
            entry["engine_build"] = report
    np.savez(writer.path("inputs/sample.npz"), **plan.request.to_npz_dict())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
        "model": {"family": source.family, "config": source.config, "params": source.params,
                  "source": source.info(), "roles": options.roles or None, "multiples": source.multiples,
                  "minimums": source.minimums,
                  "inputs": [s.to_json() for s in source.inputs],
                  "outputs": [s.to_json() for s in source.outputs]},
        "target": options.target, "device": options.device, "precision": bundle.precision,
        "segments": seg_json, "caches": [c.to_json() for c in bundle.caches],
        "passes": [dataclasses.asdict(p) for p in bundle.passes],
        "notes": list(source.notes), "files": {},
        **({"tables": tables["tables"]} if tables else {}),
    }
    writer.write_json("manifest.json", manifest)
    return manifest


def _write_tables(plan: _Plan, bundle: Bundle, writer: BundleWriter) -> dict[str, Any] | None:
    """externalize-embeddings: the tables' part files (streamed) and their manifest entries."""
    if not bundle.tables:
        return None
    from mixexport.tables.layout import tables_version
    from mixexport.tables.writer import write_tables

    plan.say(f"writing {len(bundle.tables)} tables")
    entries = write_tables(bundle.tables, writer.tmp)
    return {"tables": [e.to_json() for e in entries], "version": tables_version(entries)}


def _verify(plan: _Plan, writer: BundleWriter) -> dict[str, Any]:
    """Tensor and metric parity of the written directory (as ``mixexport verify``), plus the ledger."""
    from mixexport.verification.run import verify_bundle

    options = plan.options
    plan.say("verifying parity")
    parity = verify_bundle(writer.tmp, checkpoint=plan.source.path, data=options.data, metrics=options.metrics,
                           atol=options.atol, rtol=options.rtol, integrity=False, progress=plan.say,
                           device=options.device)
    parity["ledger"] = plan.ledger
    return parity


def _bench(plan: _Plan, writer: BundleWriter, parity: dict[str, Any]) -> dict[str, Any] | None:
    """Latency of the written directory vs eager (as ``mixexport bench``), when parity passed."""
    from mixexport.verification.run import bench_bundle

    options = plan.options
    if not (options.bench and parity["status"] == "PASS"):
        return None
    plan.say("measuring latency")
    return bench_bundle(writer.tmp, checkpoint=plan.source.path, candidates=options.bench_candidates,
                        budget_s=options.bench_budget_s, progress=plan.say, device=options.device)


def _write_reports(plan: _Plan, bundle: Bundle, writer: BundleWriter, parity: dict[str, Any],
                   latency: dict[str, Any] | None) -> None:
    from mixexport.verification.report import plot_latency, write_markdown

    writer.write_json("reports/parity.json", parity)
    if latency:
        writer.write_json("reports/latency.json", latency)
        plot_latency(latency, writer.path("reports/latency.png"))
    done = [p.name for p in bundle.passes]
    write_markdown(writer.path("reports/report.md"), f"mixexport bundle: {plan.source.family or plan.source.path.name}",
                   parity, latency, [f"Target `{plan.options.target}`, passes: {done or 'none'}.", ""])


def _commit(plan: _Plan, bundle: Bundle, writer: BundleWriter, manifest: dict[str, Any],
            parity: dict[str, Any]) -> Path:
    """The parity summary into the manifest, the gate (no bundle unless parity passed, or
    ``--keep-failed``), then the atomic rename."""
    manifest["parity"] = {"status": parity["status"], "max_rel": parity["max_rel"],
                          "delta_auc": (parity["metrics"].get("auc") or {}).get("delta"),
                          "metrics": parity["metrics"].get("status")}
    if parity["status"] != "PASS" and not plan.options.keep_failed:
        hint = "see the stage ledger with --keep-failed, or loosen --atol/--rtol per output"
        quant = next((p.name for p in bundle.passes if p.name in ("quantize-w8a16", "quantize-int8")), None)
        if quant:  # top-k choices are discontinuous
            hint += (f"; a top-k choice (MoE experts, product-key memory slots) can change for inputs near a tie "
                     f"once upstream weights are int8: keep those layers in float (--option {quant}.skip=PATTERN)")
        lines = list(parity["failures"])
        metrics = parity["metrics"]
        if metrics.get("status") == "PASS":  # only tensors failed: say what the labelled data showed
            tau = (metrics.get("ranking") or {}).get("kendall_tau_mean")
            lines.append(f"metric parity PASS on labelled data: ΔAUC {metrics['auc']['delta']:+.2g}"
                         + (f", mean Kendall tau {tau:.4f}" if tau is not None else ""))
        raise GateFailedError("parity failed; no bundle written:\n  " + "\n  ".join(lines), hint)
    return writer.commit(manifest)

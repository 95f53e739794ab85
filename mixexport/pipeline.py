"""The build pipeline: load → torch.export (dynamic batch) → program passes → ONNX per segment →
ONNX passes → backend artifacts → verify + bench on the finished directory → atomic commit.
This module orchestrates; the steps live beside it: :mod:`mixexport.stages` (the bundle between
stages, the stage ledger), :mod:`mixexport.writing` (files, manifest, reports, the gated commit).

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


from mixexport import writing
from mixexport.bundle import Bundle, BundleWriter, PassRecord
from mixexport.errors import BadInputError, MixexportError, PassError
from mixexport.export import EXTERNAL_DATA_THRESHOLD
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.options import build_options, check_specs, split_specs
from mixexport.passes.order import ORDER, pass_by_name
from mixexport.precision import ORT_CPU_PRECISIONS, PASS_PRECISIONS, check_precision_passes
from mixexport.runtime import Runtime
from mixexport.source import Source, load_source
from mixexport.stages import BuildPlan, initial_bundle, stage_runtime, to_onnx_stage  # noqa: F401 (re-exported)
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


def preconditions(source: Source, stages: dict[str, Bundle] | None = None) -> dict[str, str | None]:
    """For every pass: None if it applies to ``source``, else the precondition's message. ``stages``
    (filled in place) keeps the program- and ONNX-stage bundles built for the checks, for reuse."""
    from mixexport.errors import PreconditionError

    out: dict[str, str | None] = {}
    stages = {} if stages is None else stages
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
        manifest = writing.write_segments(plan, bundle, writer)
        parity = _verify(plan, writer)
        latency = _bench(plan, writer, parity)
        writing.write_reports(plan, bundle, writer, parity, latency)
        out = writing.commit(plan, bundle, writer, manifest, parity)
    return BuildResult(out=out, manifest=manifest, parity=parity, latency=latency,
                       seconds=time.perf_counter() - t0)


def _load(checkpoint: str | Path, options: BuildOptions, say: Progress) -> BuildPlan:
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
    return BuildPlan(options, say, backend, source, passes, pass_options, request, expected)


def _with_precision_pass(source: Source, options: BuildOptions, by_engine: bool = False) -> tuple[str, ...]:
    """The passes asked for (or the family's defaults), plus ``quantize-int8`` for ``--precision int8``
    (not when the backend quantizes itself, ``by_engine``: OpenVINO)."""
    names = tuple(source.default_passes if options.passes is None else options.passes)
    check_precision_passes(options.precision, names)
    extra = None if by_engine else PASS_PRECISIONS.get(options.precision)
    return names + (extra,) if extra and extra not in names else names


def _check_precision_target(options: BuildOptions) -> None:
    if options.target == "openvino":  # its backend's for_precision says which precisions it compiles
        return
    if options.precision in ORT_CPU_PRECISIONS and (options.target != "onnx" or options.device != "cpu"):
        raise BadInputError(f"--precision {options.precision} builds integer GEMMs for ONNX Runtime on CPU; "
                            f"found --target {options.target} --device {options.device}",
                            "use --target onnx --device cpu, or --precision w8a16 (int8 weights) "
                            "for the other targets")


def _export(plan: BuildPlan) -> Bundle:
    """torch.export with a dynamic batch axis, cast to ``--precision``: the first ledger row."""
    from mixexport.precision import cast_bundle

    plan.say("torch.export (dynamic batch)")
    bundle = cast_bundle(initial_bundle(plan.source), plan.options.precision,
                         by_hint=hasattr(plan.backend, "for_precision"))
    plan.record("torch.export", bundle)
    return bundle


def _run_passes(plan: BuildPlan, bundle: Bundle) -> Bundle:
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


def _to_onnx(plan: BuildPlan, bundle: Bundle) -> Bundle:
    plan.say("ONNX export (opset 21)")
    bundle = to_onnx_stage(bundle, plan.request)
    plan.record("onnx export", bundle)
    plan.dump("export", bundle)
    return bundle


def _verify(plan: BuildPlan, writer: BundleWriter) -> dict[str, Any]:
    """Tensor and metric parity of the written directory (as ``mixexport verify``), plus the ledger."""
    from mixexport.verification.run import verify_bundle

    options = plan.options
    plan.say("verifying parity")
    parity = verify_bundle(writer.tmp, checkpoint=plan.source.path, data=options.data, metrics=options.metrics,
                           atol=options.atol, rtol=options.rtol, integrity=False, progress=plan.say,
                           device=options.device)
    parity["ledger"] = plan.ledger
    return parity


def _bench(plan: BuildPlan, writer: BundleWriter, parity: dict[str, Any]) -> dict[str, Any] | None:
    """Latency of the written directory vs eager (as ``mixexport bench``), when parity passed."""
    from mixexport.verification.run import bench_bundle

    options = plan.options
    if not (options.bench and parity["status"] == "PASS"):
        return None
    plan.say("measuring latency")
    return bench_bundle(writer.tmp, checkpoint=plan.source.path, candidates=options.bench_candidates,
                        budget_s=options.bench_budget_s, progress=plan.say, device=options.device)



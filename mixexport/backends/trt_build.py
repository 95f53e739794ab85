"""Building one TensorRT / TensorRT-RTX engine from one ONNX segment, and what can be proven about it
without running it.

:func:`build_engine` parses the ONNX into a **strongly typed** network (precision comes from the
graph: ``--precision`` casts, int8 weights of ``quantize-w8a16``), checks the parsed network's inputs
and outputs against the manifest's specs (names, dtypes, ranks, static dims, dynamic where the
manifest says symbolic), adds one optimization profile (:mod:`.trt_profiles`) and reads it back,
sets the compute capabilities to build for (TensorRT-RTX) and builds. Every builder warning is kept
in the returned report.

:func:`dequantized_twin` turns a W8A16 segment back into float weights (``q · scale``), so the same
builder can make the float engine that the int8 engine is weighed against: an engine whose int8
weights survived is smaller by about what the int8 storage saves (see :func:`int8_engine_check`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from mixexport.backends.trt_profiles import Profile, derive_profile
from mixexport.errors import BadInputError, GateFailedError
from mixexport.specs import TensorSpec

log = logging.getLogger(__name__)

#: manifest dtype → TensorRT DataType name
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
              "bool": "BOOL", "int8": "INT8", "uint8": "UINT8"}
#: An int8 engine must be smaller than its float twin by at least this share of the bytes the int8
#: weights save in the ONNX file (the rest is slack for kernels and alignment).
INT8_SAVING_SHARE = 0.5
#: The bytes check is conclusive only when the weights' saving is at least this share of the float
#: engine: in a tiny model the engine is mostly kernels, and one int8 layer can add a weight-only
#: kernel larger than its saving (measured on a 0.13 M-parameter LONGER: -185 KB to +137 KB per layer).
CONCLUSIVE_SHARE = 0.5


@dataclass
class EngineBuild:
    plan: bytes
    timing_cache: bytes | None
    report: dict[str, Any] = field(default_factory=dict)


def _collecting_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps warnings and errors (for the build report) and logs the rest."""

    class Collect(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.WARNING):
                self.messages.append(f"{getattr(severity, 'name', severity)}: {msg}")
            log.debug("TensorRT %s: %s", getattr(severity, "name", severity), msg)

    return Collect()


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def check_network_io(network: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                     where: str) -> dict[str, Any]:
    """The parsed network's I/O against the manifest: {"inputs": [...], "outputs": [...]} as the
    network has them; raises naming every difference."""
    problems: list[str] = []
    seen: dict[str, list[dict[str, Any]]] = {"inputs": [], "outputs": []}
    for kind, specs, count, get in (("inputs", inputs, network.num_inputs, network.get_input),
                                    ("outputs", outputs, network.num_outputs, network.get_output)):
        tensors = [get(i) for i in range(count)]
        by_name = {t.name: t for t in tensors}
        if sorted(by_name) != sorted(s.name for s in specs):
            problems.append(f"{kind} {sorted(by_name)} differ from the manifest's {sorted(s.name for s in specs)}")
            continue
        for spec in specs:
            t = by_name[spec.name]
            dtype, dims = getattr(t.dtype, "name", str(t.dtype)), _dims(t.shape)
            seen[kind].append({"name": spec.name, "dtype": dtype, "shape": list(dims)})
            if TRT_DTYPES.get(spec.dtype) != dtype:
                problems.append(f"{spec.name} is {dtype} in the network, {spec.dtype} in the manifest")
            if len(dims) != len(spec.shape):
                problems.append(f"{spec.name} has rank {len(dims)} in the network, {len(spec.shape)} in the manifest")
                continue
            for i, (d, want) in enumerate(zip(dims, spec.shape)):
                # inputs: a symbolic axis must stay dynamic (-1); outputs may come out resolved
                if isinstance(want, int) and d != want or (kind == "inputs" and isinstance(want, str) and d != -1):
                    problems.append(f"{spec.name} dim {i} is {d} in the network, {want!r} in the manifest")
    if problems:
        raise BadInputError(f"the {where} network does not match the manifest: " + "; ".join(problems),
                            "report this as a bug: the ONNX segment and its specs disagree")
    return seen


def build_engine(trt: Any, onnx_path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 shapes: Mapping[str, Profile], *, label: str, timing_cache: bytes | None = None,
                 version_compatible: bool = False, archs: Sequence[str] = (),
                 multiples: Mapping[str, Any] | None = None, minimums: Mapping[str, int] | None = None,
                 maximums: Mapping[str, int] | None = None, check_io: bool = True) -> EngineBuild:
    """Parse ``onnx_path`` (external data beside it is found by the parser), check its I/O, add
    one optimization profile and build.

    ``timing_cache`` None builds without one (TensorRT-RTX: a cache makes it look for a GPU);
    ``archs`` (``sm80``…) sets the compute capabilities of a TensorRT-RTX engine.
    """
    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no parser message"]
        raise BadInputError(f"{label} cannot parse {onnx_path.name}: {errors[0]}"
                            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                            "the graph uses an operator or pattern this parser does not support")
    io = check_network_io(network, inputs, outputs, f"{label} {onnx_path.name}") if check_io else {}
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    wanted = derive_profile(inputs, shapes, multiples, minimums, maximums)
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in wanted:
            raise BadInputError(f"network input {name!r} of {onnx_path.name} is not in the manifest's specs",
                                "rebuild the bundle")
        profile.set_shape(name, *wanted[name])
    got = {n: [list(_dims(s)) for s in profile.get_shape(n)] for n in wanted}
    if got != {n: [list(s) for s in v] for n, v in wanted.items()} or config.add_optimization_profile(profile) < 0:
        raise BadInputError(f"{label} refused the optimization profile of {onnx_path.name}: {got}",
                            "check --shapes against the model's axes")
    if archs:
        config.num_compute_capabilities = len(archs)
        for i, arch in enumerate(archs):
            config.set_compute_capability(compute_capability(trt, arch), i)
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache)
        config.set_timing_cache(cache, False)  # False: a cache from another version/GPU is an error
    if version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if flag is None:
            raise BadInputError(f"--version-compatible is not supported by {label}", "drop --version-compatible")
        config.set_flag(flag)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        errors = [m for m in logger.messages if m.startswith(("ERROR", "INTERNAL_ERROR"))]
        hint = "check the optimization profile (--shapes) and the graph's ops"
        if any("Quantized constant" in m for m in errors):
            hint = ("TensorRT reads a quantized constant only through DequantizeLinear: use "
                    "--option quantize-w8a16.embedding_form=dequantize-first (the trt/trt-rtx default)")
        raise BadInputError(f"{label} could not build an engine from {onnx_path.name}: "
                            + (errors[0] if errors else "see its log (-v)"), hint)
    data = bytes(plan)
    new_cache = bytes(config.get_timing_cache().serialize()) if timing_cache is not None else None
    report = {"seconds": round(seconds, 3), "bytes": len(data), "archs": list(archs),
              "profile": {n: [list(s) for s in v] for n, v in wanted.items()}, "io": io,
              "warnings": sorted(set(logger.messages))}
    return EngineBuild(data, new_cache, report)


def compute_capability(trt: Any, arch: str) -> Any:
    """``sm86`` → ``trt.ComputeCapability.SM86``; unknown ones are refused with the known list."""
    member = getattr(trt.ComputeCapability, arch.upper(), None)
    if member is None or arch.upper() in ("CURRENT", "NONE"):
        known = [n.lower() for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
        raise BadInputError(f"--arch {arch}: this TensorRT-RTX cannot build for it; it knows {known}",
                            "pick from those")
    return member


# --------------------------------------------------------------------------------------------
# int8 weights in the engine

def _dequantize(q: np.ndarray, scale: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """What DequantizeLinear (no zero point) computes on a constant: per-tensor, per-axis, blocked."""
    x, s = q.astype(np.float32), scale.astype(np.float32)
    if s.ndim == 0:
        return x * s
    axis = int(attrs.get("axis", 1)) % q.ndim
    if attrs.get("block_size"):
        return x * np.repeat(s, int(attrs["block_size"]), axis=axis)
    shape = [1] * q.ndim
    shape[axis] = -1
    return x * s.reshape(shape)


def dequantized_twin(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` in which every ``DequantizeLinear`` of an int8 initializer is replaced by
    the float initializer it computes (in the scale's dtype); returns it and how many were replaced."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    g = twin.graph
    inits = {t.name: t for t in g.initializer}
    keep, added, used = [], [], set()
    for node in g.node:
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        s = inits.get(node.input[1]) if q is not None and len(node.input) > 1 else None
        if q is None or s is None or q.data_type != onnx.TensorProto.INT8:
            keep.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale = numpy_helper.to_array(s)
        value = _dequantize(numpy_helper.to_array(q), scale, attrs).astype(scale.dtype)
        added.append(numpy_helper.from_array(value, node.output[0]))
        used.update(node.input[:2])
    still = {i for n in keep for i in n.input}
    kept = [t for t in g.initializer if t.name not in used or t.name in still]
    g.ClearField("node")
    g.node.extend(keep)
    g.ClearField("initializer")
    g.initializer.extend(kept + added)
    return twin, len(added)


def int8_engine_check(engine_bytes: int, float_engine_bytes: int, onnx_saving: int) -> dict[str, Any]:
    """The int8 engine against its float twin. Where weights dominate the engine (their int8 saving is
    at least :data:`CONCLUSIVE_SHARE` of the float engine), PASS needs the engine to be smaller by at
    least :data:`INT8_SAVING_SHARE` of that saving — a builder that folded the weights back to float
    saves ~nothing; elsewhere the status is ``inconclusive`` (kernels dominate), with the numbers."""
    saving = float_engine_bytes - engine_bytes
    conclusive = onnx_saving >= CONCLUSIVE_SHARE * float_engine_bytes
    status = ("PASS" if saving >= INT8_SAVING_SHARE * onnx_saving else "FAIL") if conclusive else "inconclusive"
    return {"status": status, "engine_bytes": engine_bytes, "float_engine_bytes": float_engine_bytes,
            "ratio": round(engine_bytes / float_engine_bytes, 4) if float_engine_bytes else None,
            "saving_bytes": saving, "onnx_saving_bytes": onnx_saving,
            "rule": (f"saving >= {INT8_SAVING_SHARE} x the int8 weights' saving in the ONNX file, checked when "
                     f"that saving is >= {CONCLUSIVE_SHARE} x the float engine (weights dominate it)")}


def require_int8_engines(checks: Mapping[str, Mapping[str, Any]], label: str) -> None:
    failed = {k: v for k, v in checks.items() if v["status"] == "FAIL"}
    if failed:
        raise GateFailedError(f"{label} folded int8 weights back to float in segment(s) "
                              + ", ".join(f"{k} ({v['engine_bytes']} B vs float {v['float_engine_bytes']} B)"
                                          for k, v in failed.items()),
                              "keep quantize-w8a16's DequantizeLinear → MatMul/Gemm pattern intact")

"""Int8 survival: prove from ONNX Runtime's *optimized* graph that the int8 weights of
``quantize-w8a16`` are still int8 where the bundle runs.

A W8A16 graph can lose its int8 weights after export in three ways, all seen with onnxruntime 1.32
on CPU: constant folding turns ``DequantizeLinear(int8 initializer)`` back into a float initializer
(``session.disable_quant_qdq=1``); the QDQ transformer rewrites ``DequantizeLinear → MatMul`` into
``MatMulNBits`` (2-D ``[K,N]`` MatMul and ``Gemm(transB=0)`` weights), which with ORT's default
accuracy level 4 also quantizes the activations (W8A8); or a rewrite to
``DynamicQuantizeLinear``/``MatMulIntegerToFloat``. The check builds a session with the bundle's own
session options, has ORT save the graph it will run (``optimized_model_filepath``) and reads it.

The weight form it accepts is the pass's reference form and nothing else:

- GEMM weights: an INT8 initializer read only by ``DequantizeLinear`` (input 0) whose output is
  read only as the weight (input 1) of ``MatMul``/``Gemm`` or ORT's ``FusedMatMul``/``FusedGemm``;
- embedding tables: an INT8 initializer read only by ``Gather`` (input 0) whose rows are read only by
  ``DequantizeLinear`` (``embedding_form=gather-first``), or read only by ``DequantizeLinear`` whose
  output is read only as the table (input 0) of ``Gather`` (``dequantize-first``, TensorRT's form).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import onnx
from onnx import TensorProto

from mixexport.bundle import Manifest
from mixexport.checked_load import read_checked_onnx
from mixexport.errors import BadInputError, EnvironmentUnavailableError, GateFailedError

#: Nodes that read a weight through its DequantizeLinear and keep activations in float.
GEMM_OPS = {("", "MatMul"), ("", "Gemm"), ("com.microsoft", "FusedMatMul"), ("com.microsoft", "FusedGemm")}
#: Ops whose appearance means ORT rewrote the W8A16 pattern (weight repacked or activations quantized).
REWRITE_OPS = {"MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
               "MatMulInteger", "QLinearMatMul", "QGemm", "QuantizeLinear", "GatherBlockQuantized"}
#: Session option keys this check understands (those of mixexport.backends.onnxruntime.OrtSession);
#: an unknown key is an error rather than silently ignored, so the check never builds a different
#: session than the bundle's.
KNOWN_OPTIONS = {"graph_optimization_level", "config", "intra_op_num_threads", "optimized_model_path"}
PASS_NAME = "quantize-w8a16"


def int8_weights(model: onnx.ModelProto) -> dict[str, str]:
    """INT8 initializers read by ``DequantizeLinear`` (→ ``"gemm"``) or ``Gather`` (→ ``"embedding"``)."""
    g = model.graph
    int8 = {t.name for t in g.initializer if t.data_type == TensorProto.INT8}
    out: dict[str, str] = {}
    for node in g.node:
        if node.input and node.input[0] in int8:
            if node.op_type == "DequantizeLinear":
                out.setdefault(node.input[0], "gemm")
            elif node.op_type == "Gather":
                out.setdefault(node.input[0], "embedding")
    return out


def optimized_graph(model: onnx.ModelProto | str | Path, session_options: Mapping[str, Any],
                    device: str = "cpu", external: Mapping[str, bytes | bytearray] | None = None) -> onnx.ModelProto:
    """The graph ONNX Runtime runs for ``model`` under ``session_options`` (weights not loaded).
    ``external``: the external-data files of an in-memory ``model`` by location, handed to ORT
    from memory (no file is read: the folder ORT would read others from is an empty directory)."""
    import onnxruntime as ort

    unknown = sorted(set(session_options) - KNOWN_OPTIONS)
    if unknown:
        raise BadInputError(f"int8 survival check: unknown session option keys {unknown}; it knows "
                            f"{sorted(KNOWN_OPTIONS)}", "teach mixexport.verification.int8 the new keys")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EnvironmentUnavailableError("int8 survival check on cuda needs onnxruntime-gpu and a GPU")
        providers.insert(0, "CUDAExecutionProvider")
    with tempfile.TemporaryDirectory(prefix="mixexport-int8-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # ORT warns that an ORT_ENABLE_ALL graph is hardware specific: known
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              session_options.get("graph_optimization_level", "ORT_ENABLE_ALL"))
        for key, value in (session_options.get("config") or {}).items():
            so.add_session_config_entry(key, str(value))
        if session_options.get("intra_op_num_threads"):
            so.intra_op_num_threads = int(session_options["intra_op_num_threads"])
        out = os.path.join(tmp, "optimized.onnx")
        so.optimized_model_filepath = out
        # weights go to a side file that is never read back: the check needs dtypes and edges only
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
        if external:  # the runtime's session, mixexport.backends.onnxruntime, refused an old ORT already
            names = list(external)
            so.add_external_initializers_from_files_in_memory(names, [external[n] for n in names],
                                                              [len(external[n]) for n in names])
        if external is not None:
            empty = os.path.join(tmp, "no-files")
            os.mkdir(empty)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
        ort.InferenceSession(src, so, providers=providers)
        return onnx.load_model(out, load_external_data=False)


def survival_report(model: onnx.ModelProto | str | Path, session_options: Mapping[str, Any],
                    expected: Iterable[str] | None = None, device: str = "cpu",
                    external: Mapping[str, bytes | bytearray] | None = None) -> dict[str, Any]:
    """Check every int8 weight of ``model`` (or the ``expected`` names) in ORT's optimized graph.

    Returns ``{"status": "PASS"|"FAIL", "weights": {name: "ok" | why}, "failures": [...],
    "rewrites": {op: count}, ...}``; never raises for a failed check (see :func:`check_int8_survival`).
    """
    src = model if isinstance(model, onnx.ModelProto) else onnx.load_model(os.fspath(model), load_external_data=False)
    found = int8_weights(src)
    names = list(found) if expected is None else list(expected)
    failures = [f"{n}: not an int8 DequantizeLinear/Gather weight in the model file" for n in names if n not in found]
    opt = optimized_graph(model, session_options, device, external)
    before = _op_counts(src)
    after = _op_counts(opt)
    rewrites = {op: n for op, n in after.items() if op in REWRITE_OPS and n > before.get(op, 0)}
    graphs = _Graphs(src, opt)
    verdicts = {n: graphs.verdict(n, found[n]) for n in names if n in found}
    failures += [f"{n}: {why}" for n, why in verdicts.items() if why != "ok"]
    if rewrites and not failures:  # a rewrite that touched no int8 weight still changed the numerics
        failures.append(f"ORT introduced {rewrites}")
    return {"status": "FAIL" if failures else "PASS", "device": device, "session_options": dict(session_options),
            "int8_weights": len(names), "surviving": sum(v == "ok" for v in verdicts.values()),
            "weights": verdicts, "rewrites": rewrites, "optimized_ops": after, "failures": failures}


def check_int8_survival(model: onnx.ModelProto | str | Path, session_options: Mapping[str, Any],
                        expected: Iterable[str] | None = None, device: str = "cpu") -> dict[str, Any]:
    """:func:`survival_report`, raising :class:`GateFailedError` naming every folded or rewritten weight."""
    report = survival_report(model, session_options, expected, device)
    if report["status"] != "PASS":
        raise GateFailedError("int8 weights did not survive ONNX Runtime's optimizations:\n  "
                              + "\n  ".join(report["failures"]), _HINT)
    return report


def int8_survival(manifest: Manifest, device: str | None = None) -> dict[str, Any]:
    """The survival check for every segment of a bundle, with each segment's ``session_options``.

    Expected weights are those the ``quantize-w8a16`` record lists for the segment (so a file that
    lost them fails too), else every int8 weight in the file. ``{"status": "skipped"}`` when the
    bundle has no int8 weights and the pass did not run. Raises :class:`GateFailedError` naming every
    failing weight of every segment.
    """
    from mixexport.backends.onnxruntime import OnnxRuntimeBackend

    device = device or manifest.data.get("device", "cpu")
    record = next((p for p in manifest.data.get("passes", []) if p.get("name") == PASS_NAME), None)
    listed = ((record or {}).get("report") or {}).get("segments") or {}
    segments, failures = {}, []
    for seg in manifest.segments:
        expected = (listed.get(seg.name) or {}).get("int8_weights") if record else None
        # the graph from bytes read once and hashed, and ORT's run below on the same bytes
        # (mixexport.checked_load): nothing swapped after the check changes the verdict
        checked = read_checked_onnx(manifest.root, manifest.data["files"], seg.file, with_external=False)
        model = onnx.ModelProto()
        model.ParseFromString(checked.model)
        found = int8_weights(model)
        if expected is None and not found:
            continue
        if seg.backend not in ("onnxruntime", "memory"):
            # another backend runs this segment (its engine check is that backend's); here only the
            # file is checked: every expected weight must still be int8 in it
            missing = [f"{n}: not an int8 DequantizeLinear/Gather weight in the model file"
                       for n in (expected or found) if n not in found]
            rep = {"status": "FAIL" if missing else "PASS", "checked": f"file only (runs on {seg.backend})",
                   "int8_weights": len(expected or found), "failures": missing}
        else:
            options = seg.session_options or OnnxRuntimeBackend(device).session_options()
            checked = read_checked_onnx(manifest.root, manifest.data["files"], seg.file)
            rep = survival_report(model, options, expected, device,
                                  external={loc: f.data for loc, f in checked.external.items()})
            del checked
        segments[seg.name] = rep
        failures += [f"segment {seg.name}: {f}" for f in rep["failures"]]
    if not segments:
        return {"status": "skipped", "reason": f"no int8 weights ({PASS_NAME} did not run)"}
    if failures:
        raise GateFailedError("int8 weights did not survive ONNX Runtime's optimizations:\n  "
                              + "\n  ".join(failures), _HINT)
    return {"status": "PASS", "segments": segments}


_HINT = ("pin session.qdq_matmulnbits_accuracy_level=0 and optimization.disable_specified_optimizers="
         "QDQSelectorActionTransformer (';'-separated in onnxruntime 1.32), and never session.disable_quant_qdq=1")


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out


class _Graphs:
    """Edges of the source and the optimized graph, built once for all weights."""

    def __init__(self, src: onnx.ModelProto, opt: onnx.ModelProto) -> None:
        self.src_uses = _consumers(src)
        self.inits = {t.name: t for t in opt.graph.initializer}
        self.uses = _consumers(opt)
        self.producers = {o: n for n in opt.graph.node for o in n.output}

    def verdict(self, name: str, kind: str) -> str:
        """"ok", or what ORT did to int8 weight ``name`` (folded, rewritten, removed, read otherwise)."""
        t = self.inits.get(name)
        if t is None:
            return self.what_happened(name)
        if t.data_type != TensorProto.INT8:
            return f"now a {TensorProto.DataType.Name(t.data_type)} initializer (expected INT8)"
        if not self.uses.get(name):
            return "no longer read by any node"
        first = "DequantizeLinear" if kind == "gemm" else "Gather"
        for node, idx in self.uses[name]:
            if node.op_type != first or idx != 0:
                return f"read by {node.op_type} ({node.name}) input {idx}; expected {first} input 0"
            readers = self.uses.get(node.output[0], [])
            if not readers:
                return f"{first} {node.name} output is unused"
            for reader, j in readers:
                table = reader.op_type == "Gather" and j == 0  # embedding_form=dequantize-first
                if kind == "gemm" and not table and ((reader.domain, reader.op_type) not in GEMM_OPS or j != 1):
                    return (f"DequantizeLinear output read by {reader.op_type} ({reader.name}) input {j}; "
                            "expected the weight input of MatMul/Gemm or the table of Gather")
                if kind == "embedding" and (reader.op_type != "DequantizeLinear" or j != 0):
                    return f"gathered int8 rows read by {reader.op_type} ({reader.name}); expected DequantizeLinear"
        return "ok"

    def what_happened(self, name: str) -> str:
        """The int8 initializer is gone: folded back to float, or which rewrite consumed it."""
        for dq, _ in self.src_uses.get(name, []):
            out = dq.output[0]
            if out in self.inits:
                dtype = TensorProto.DataType.Name(self.inits[out].data_type)
                return f"folded back to float: {out} is now a {dtype} initializer"
            for reader, _ in self.src_uses.get(out, []):
                for y in reader.output:  # a rewrite keeps the GEMM's output name
                    node = self.producers.get(y)
                    if node is not None and node.op_type in REWRITE_OPS:
                        return _describe_rewrite(node)
        return "removed by ORT's optimizations (no int8 initializer of that name left)"


def _describe_rewrite(node: onnx.NodeProto) -> str:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    detail = ", ".join(f"{k}={attrs[k]}" for k in ("bits", "accuracy_level", "block_size") if k in attrs)
    where = f" ({node.name})" if node.name else ""
    # MatMulNBits accuracy_level 4 computes with int8 activations; 0 (unset) and 1 keep float32
    act = " (int8 activations: W8A8)" if node.op_type == "MatMulNBits" and attrs.get("accuracy_level", 0) == 4 else ""
    return f"rewritten by ORT into {node.op_type}({detail}){where}{act}"

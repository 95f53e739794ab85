"""``quantize-w8a16`` (ONNX stage): int8 weights, activations untouched (W8A16).

Weight loading dominates the small-batch GEMMs of a mixer model (at a few hundred rows a GEMM does
little arithmetic per weight byte it reads), so the weights are stored as symmetric int8 plus a
scale and dequantized next to the GEMM; activations keep the model's compute dtype (fp32 here,
fp16/bf16 where a precision pass made them so).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixexport.backends.onnxruntime import DEFAULT_OPTIONS
from mixexport.bundle import Bundle
from mixexport.errors import BadInputError, PreconditionError
from mixexport.int8_weights import (FLOAT_TYPES, Weight, candidates, nbytes, opset, quantize_array, require_weights,
                                     unique_name, weight_errors)
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.options import EMBEDDINGS, GRANULARITIES
from mixexport.passes.options import QuantizeW8A16Options as Options

#: Name patterns of the head / towers (``skip_head``): the reference families' ``head.towers.*``.
HEAD_PATTERNS = ("head.*", "*.head.*", "*tower*")
MIN_OPSET = 21  # blocked DequantizeLinear (block_size) is opset 21
#: ORT keeps this pass's graph as-is under the bundle's session options
#: (mixexport.backends.onnxruntime.DEFAULT_OPTIONS): they disable the QDQ selector/action
#: transformer (which rewrites 2-D [K,N] / Gemm(transB=0) weights into MatMulNBits) and pin the
#: MatMulNBits accuracy level to 0 (float activations; ORT's default, 4, would make it W8A8).


def requires(bundle: Bundle) -> None:
    """ONNX stage, opset ≥ 21, and at least one MatMul/Gemm whose weight (B) is a float initializer."""
    if bundle.stage != "onnx":
        raise PreconditionError(f"quantize-w8a16 works on ONNX segments; found a {bundle.stage}-stage bundle")
    found = []
    for seg in bundle.segments:
        version = opset(seg.onnx)
        if version < MIN_OPSET:
            raise PreconditionError(f"quantize-w8a16 needs ONNX opset >= {MIN_OPSET} (blocked DequantizeLinear); "
                                    f"segment {seg.name!r} has opset {version}", "export with opset 21")
        weights, _ = candidates(seg.onnx)
        found += [w for w in weights if w.kind != "embedding"]
    require_weights("quantize-w8a16", "float", found, [seg.onnx for seg in bundle.segments])


def quantize_w8a16(bundle: Bundle, options: Options) -> PassResult:
    """Store MatMul/Gemm weights (and optionally embedding tables) as symmetric int8 + scale.

    Cases handled (every segment; the input bundle's ModelProtos are copied, never changed):

    - ``MatMul`` with a 2-D float initializer ``B [K,N]``: ``DequantizeLinear(q, scale[N], axis=1)``.
    - ``Gemm`` with ``B``: ``transB=1`` ``[N,K]`` → ``axis=0``; ``transB=0`` ``[K,N]`` → ``axis=1``.
    - ``MatMul`` with a per-token float initializer ``[T,D,H]`` (any rank ≥ 3, leading dims are
      batch): per-(token, channel) scale ``[T,1,H]`` as a blocked ``DequantizeLinear(axis=1,
      block_size=D)`` (opset 21); ``per-channel``: scale ``[H]``, ``axis=2``; ``per-tensor``: scalar.
    - ``Gather(axis=0)`` on a float table ``[R,E]``, ``embedding_form=gather-first``: the int8 rows
      are gathered, then dequantized — ``per-column``: ``DequantizeLinear(rows, scale[E],
      axis=-1)``; ``per-row``: the scales ``[R,1]`` are gathered too, ``DequantizeLinear(rows,
      row_scales, axis=-1, block_size=E)``. Only the looked-up rows are dequantized.
      ``dequantize-first``: ``DequantizeLinear(int8 [R,E], scale[E], axis=1)`` (per-row:
      ``scale[R], axis=0``) → ``Gather``: the pattern TensorRT takes.
    - The DequantizeLinear output keeps the weight's name and feeds the MatMul/Gemm directly (no
      Cast/Reshape/Transpose between); no zero point; the scale has the weight's float dtype.

    Left in float, with the reason in the report: biases, norms and other initializers; names
    matching ``skip`` (routers by default) and the head/first/last when asked; a weight that is also
    read by another kind of node or inside a subgraph, is a graph input/output, or is float64.
    """
    segments, layers, skipped, seg_report = [], [], [], {}
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for seg in bundle.segments:
        model = onnx.ModelProto()
        model.CopyFrom(seg.onnx)  # purity: the input bundle's proto is never touched
        lay, skip = _quantize_model(model, options, seg.name, before, after)
        layers += lay
        skipped += skip
        seg_report[seg.name] = {"int8_weights": [x["int8"] for x in lay]}
        segments.append(dataclasses.replace(seg, onnx=model))
    if not layers:
        raise BadInputError("quantize-w8a16: every candidate weight was skipped: "
                            + "; ".join(f"{s['name']} ({s['reason']})" for s in skipped),
                            "relax --option quantize-w8a16.skip / skip_head / skip_first / skip_last")
    tb, ta = sum(before.values()), sum(after.values())
    report = {
        "granularity": options.granularity, "embeddings": options.embeddings,
        "embedding_form": options.embedding_form,
        "weight_bytes": {"before": {"total": tb, **before}, "after": {"total": ta, **after},
                         "ratio": ta / tb if tb else 1.0},
        "error_by_granularity": _error_summary(layers),
        "layers": layers, "skipped": skipped, "segments": seg_report,
        "ort_session_config": dict(DEFAULT_OPTIONS["config"]),
        "matmulnbits_rewritable": [x["name"] for x in layers if len(x["shape"]) == 2
                                   and x["op"] in ("MatMul", "Gemm(transB=0)")],
        "notes": [
            "rel_error = ||W - dequant(q)||_F / ||W||_F per layer; rel_error_by_granularity gives it for "
            "every granularity option (2-D weights: per-token-channel = per-channel) or, for embedding "
            "tables, every embeddings mode",
            "ORT keeps this graph with ort_session_config (onnxruntime 1.32; join optimizer names with ';'). "
            "Without it, 2-D MatMul [K,N] and Gemm(transB=0) weights (matmulnbits_rewritable) become "
            "MatMulNBits, with int8 activations (W8A8) at ORT's default accuracy level 4, float ones at "
            "level 0; Gemm(transB=1) and [T,D,H] weights are never rewritten. "
            "mixexport.verification.int8 checks the optimized graph",
            "never set session.disable_quant_qdq=1: ORT then constant-folds the int8 weights to float",
        ],
    }
    return PassResult(bundle.replace(segments=tuple(segments), precision="w8a16"), report)


# --------------------------------------------------------------------------------------------
# finding the weights


# --------------------------------------------------------------------------------------------
# quantizing

def _layout(kind: str, trans_b: bool, rank: int, granularity: str) -> tuple[tuple[int, ...], dict[str, int]]:
    """(axes reduced to one scale, DequantizeLinear attributes) for a weight of this kind."""
    if kind == "embedding":              # applied to the gathered rows [..., E], hence axis -1
        return ((1,) if granularity == "per-row" else (0,)), {"axis": -1}
    if granularity == "per-tensor":
        return tuple(range(rank)), {}
    if rank == 2:
        out = 0 if (kind == "gemm" and trans_b) else 1
        return (1 - out,), {"axis": out}
    if granularity == "per-channel":      # [..., D, H]: one scale per H shared by the leading dims
        return tuple(range(rank - 1)), {"axis": rank - 1}
    return (rank - 2,), {"axis": rank - 2}  # per token and channel: blocked over D


def _skip_reason(w: Weight, options: Options, first: str | None, last: str | None) -> str | None:
    patterns = options.skip + (HEAD_PATTERNS if options.skip_head else ())
    hit = next((p for p in patterns if fnmatch.fnmatchcase(w.name, p)), None)
    if hit:
        return f"matches skip pattern {hit!r}"
    if w.kind == "embedding":
        return "embeddings=float" if options.embeddings == "float" else None
    if options.skip_first and w.name == first:
        return "skip_first"
    if options.skip_last and w.name == last:
        return "skip_last"
    return None


def _quantize_weight(arr: np.ndarray, w: Weight, gran: str, dtype: type, form: str = "gather-first"
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, int], np.ndarray]:
    """(int8 values, scale as stored, DequantizeLinear attributes, scale with the weight's rank)."""
    rank = arr.ndim
    reduce, attrs = _layout(w.kind, w.trans_b, rank, gran)
    q, scale_kd = quantize_array(arr, reduce, dtype)
    if w.kind == "embedding" and form == "dequantize-first":  # per-axis on the table itself
        attrs = {"axis": 0 if gran == "per-row" else 1}
        scale = scale_kd.reshape(-1)
    elif w.kind == "embedding" and gran == "per-column":
        scale = scale_kd.reshape(-1)  # per-axis on the gathered rows' last dim: nothing to gather
    elif len(reduce) == 1 and (rank > 2 or w.kind == "embedding"):
        attrs["block_size"] = arr.shape[reduce[0]]  # blocked: the scale keeps the weight's rank
        scale = scale_kd
    else:  # per-axis (1-D, the length of the axis) or per-tensor (scalar)
        scale = scale_kd.reshape([arr.shape[attrs["axis"]]] if "axis" in attrs else [])
    return q, scale, attrs, scale_kd


def _gather_nodes(node: onnx.NodeProto, q_name: str, s_name: str, per_row: bool, attrs: dict[str, int],
                  taken: set[str]) -> list[onnx.NodeProto]:
    """``Gather(table, idx)`` → ``Gather(int8, idx)`` [+ ``Gather(row scales, idx)``] → DequantizeLinear."""
    idx, out = node.input[1], node.output[0]
    rows_q, rows_s = unique_name(f"{out}.int8", taken), unique_name(f"{out}.scale", taken)
    nodes = [helper.make_node("Gather", [q_name, idx], [rows_q], unique_name(f"{node.name}_int8", taken), axis=0)]
    if per_row:
        nodes.append(helper.make_node("Gather", [s_name, idx], [rows_s], unique_name(f"{node.name}_scale", taken), axis=0))
    nodes.append(helper.make_node("DequantizeLinear", [rows_q, rows_s if per_row else s_name], [out],
                                  unique_name(f"{node.name}_dq", taken), **attrs))
    return nodes


def _quantize_model(model: onnx.ModelProto, options: Options, segment: str, before: dict[str, int],
                    after: dict[str, int]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rewrite ``model`` (a private copy) in place; returns (layer reports, skipped weights) and adds
    the initializer bytes by kind to ``before``/``after``."""
    g = model.graph
    weights, rejected = candidates(model)
    skipped = [{"segment": segment, **s} for s in rejected]
    gemm_names = [w.name for w in weights if w.kind != "embedding"]
    first, last = (gemm_names[0], gemm_names[-1]) if gemm_names else (None, None)
    inits = {t.name: t for t in g.initializer}
    kinds = {w.name: ("embedding" if w.kind == "embedding" else "gemm") for w in weights}
    _count(g.initializer, lambda t: kinds.get(t.name, "other"), before)
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {n.name for n in g.node}
    before_node: dict[int, list[onnx.NodeProto]] = {}   # DequantizeLinear nodes to insert before node i
    replace: dict[int, list[onnx.NodeProto]] = {}       # node i (an embedding Gather) replaced by these
    layers: list[dict[str, Any]] = []
    for w in weights:
        reason = _skip_reason(w, options, first, last)
        if reason:
            skipped.append({"segment": segment, "name": w.name, "reason": reason})
            continue
        t = inits[w.name]
        dtype = FLOAT_TYPES[t.data_type]
        arr = numpy_helper.to_array(t)
        gran = options.embeddings if w.kind == "embedding" else options.granularity
        q, scale, attrs, scale_kd = _quantize_weight(arr, w, gran, dtype, options.embedding_form)
        rel, max_abs = weight_errors(arr, q, scale_kd)
        q_name, s_name = unique_name(f"{w.name}.int8", taken), unique_name(f"{w.name}.scale", taken)
        g.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
        if w.kind == "embedding" and options.embedding_form == "dequantize-first":
            deq = unique_name(f"{w.name}.dequantized", taken)  # one DequantizeLinear, read by every Gather
            before_node.setdefault(w.consumers[0], []).append(helper.make_node(
                "DequantizeLinear", [q_name, s_name], [deq], unique_name(f"{w.name}_DequantizeLinear", taken), **attrs))
            for i in w.consumers:
                node = onnx.NodeProto()
                node.CopyFrom(g.node[i])
                node.input[0] = deq
                replace[i] = [node]
        elif w.kind == "embedding":
            for i in w.consumers:
                replace[i] = _gather_nodes(g.node[i], q_name, s_name, gran == "per-row", attrs, taken)
        else:  # one DequantizeLinear, named like the weight, so its readers are unchanged
            before_node.setdefault(w.consumers[0], []).append(helper.make_node(
                "DequantizeLinear", [q_name, s_name], [w.name], unique_name(f"{w.name}_DequantizeLinear", taken), **attrs))
        alternatives = EMBEDDINGS[:2] if w.kind == "embedding" else GRANULARITIES
        by_gran = {alt: weight_errors(arr, *quantize_array(arr, _layout(w.kind, w.trans_b, arr.ndim, alt)[0], dtype))[0]
                   for alt in alternatives}
        layers.append({"segment": segment, "name": w.name, "int8": q_name, "scale": s_name,
                       "kind": w.kind if arr.ndim == 2 else "per-token", "shape": list(arr.shape),
                       "op": {"matmul": "MatMul", "embedding": "Gather"}.get(w.kind, f"Gemm(transB={int(w.trans_b)})"),
                       "dtype": TensorProto.DataType.Name(t.data_type), "granularity": gran,
                       "scale_shape": list(scale.shape), "dequantize": attrs,
                       "bytes_before": nbytes(t), "bytes_after": q.nbytes + scale.nbytes,
                       "rel_error": rel, "max_abs_error": max_abs, "rel_error_by_granularity": by_gran})
    nodes = []
    for i, node in enumerate(g.node):
        nodes += before_node.get(i, []) + replace.get(i, [node])
    g.ClearField("node")
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in {x["name"] for x in layers}]
    g.ClearField("initializer")
    g.initializer.extend(kept)
    role = {x["int8"]: f"{_base(x)}_int8" for x in layers} | {x["scale"]: f"{_base(x)}_scales" for x in layers}
    _count(g.initializer, lambda t: role.get(t.name) or (f"{kinds[t.name]}_float" if t.name in kinds else "other"),
           after)
    return layers, skipped


def _base(layer: dict[str, Any]) -> str:
    return "embedding" if layer["kind"] == "embedding" else "gemm"


def _count(tensors: Iterable[TensorProto], key: Callable[[TensorProto], str], into: dict[str, int]) -> None:
    for t in tensors:
        k = key(t)
        into[k] = into.get(k, 0) + nbytes(t)


def _error_summary(layers: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Max / mean per-layer relative weight error of the MatMul/Gemm layers, per granularity."""
    out = {}
    for gran in GRANULARITIES:
        errs = [x["rel_error_by_granularity"][gran] for x in layers if x["kind"] != "embedding"]
        if errs:
            out[gran] = {"max_rel_error": max(errs), "mean_rel_error": float(np.mean(errs))}
    return out


PASS = PassInfo(name="quantize-w8a16", stage="onnx", run=quantize_w8a16, options=Options, requires=requires)

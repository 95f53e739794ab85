"""Int8 weights shared by the quantization passes (``quantize-w8a16``, ``quantize-int8``): which
float initializers are MatMul/Gemm weights or Gather tables, and symmetric int8 with per-axis scales.

Not a pass: the helpers both passes use, in one place (as :mod:`mixexport.partition` is for the
request-level passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

#: Float dtypes DequantizeLinear (opset 21) can output: the scale carries the compute dtype.
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
               TensorProto.BFLOAT16: ml_dtypes.bfloat16}
OTHER_FLOATS = {TensorProto.DOUBLE}  # left float (DequantizeLinear cannot output it), reason reported
QMAX = 127      # symmetric: [-127, 127], so -q is always representable and zero is exact


@dataclass(frozen=True)
class Weight:
    """A float initializer and how the graph reads it."""

    name: str
    kind: str                 # "matmul" (B of MatMul), "gemm" (B of Gemm) or "embedding" (Gather data)
    consumers: tuple[int, ...]
    trans_b: bool = False


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def describe_b(node: onnx.NodeProto, inits: dict[str, TensorProto]) -> str:
    if len(node.input) < 2:
        return "absent"
    t = inits.get(node.input[1])
    if t is None:
        return "activations"
    return f"{TensorProto.DataType.Name(t.data_type)} initializers"


def require_weights(pass_name: str, dtype: str, found: list[Weight], models: list[onnx.ModelProto]) -> None:
    """Refuse (PreconditionError) when ``found`` is empty, naming what every MatMul/Gemm B input of
    ``models`` is instead."""
    from mixexport.errors import PreconditionError

    if found:
        return
    seen: set[str] = set()
    for model in models:
        inits = {t.name: t for t in model.graph.initializer}
        seen |= {describe_b(n, inits) for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
    raise PreconditionError(
        f"{pass_name} expected at least one MatMul/Gemm whose weight (B) input is a {dtype} "
        f"initializer; found {'MatMul/Gemm B inputs that are ' + ', '.join(sorted(seen)) if seen else 'no MatMul/Gemm'}",
        "the model has no float weights to quantize (already quantized?)")


def subgraph_names(model: onnx.ModelProto) -> set[str]:
    """Every name read inside a subgraph (If/Loop/Scan bodies): those weights stay float."""
    names: set[str] = set()

    def visit(graph: onnx.GraphProto, inside: bool) -> None:
        for node in graph.node:
            if inside:
                names.update(node.input)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    visit(sub, True)

    visit(model.graph, False)
    return names


def candidates(model: onnx.ModelProto) -> tuple[list[Weight], list[dict[str, str]]]:
    """Float initializers read only as MatMul/Gemm B or Gather data, and why others are left out."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(g.node):
        for j, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((i, j))
    io = {v.name for v in list(g.input) + list(g.output)}
    in_subgraph = subgraph_names(model)
    weights, rejected = [], []
    for name, use in uses.items():
        roles = {weight_role(g.node[i], j) for i, j in use}
        t = inits[name]
        if roles == {None} or t.data_type not in (*FLOAT_TYPES, *OTHER_FLOATS):
            continue  # biases, norms, shape constants, integer tables: not float weights
        reason = None
        if None in roles:
            reason = "also read by a node that is not a MatMul/Gemm weight or Gather table input"
        elif len(roles) > 1:
            reason = "read with different layouts (MatMul/Gemm transB/Gather)"
        elif t.data_type not in FLOAT_TYPES:
            reason = f"dtype {TensorProto.DataType.Name(t.data_type)} (float32/float16/bfloat16 only)"
        elif name in io or name in in_subgraph:
            reason = "a graph input/output or read inside a subgraph"
        elif t.data_location == TensorProto.EXTERNAL:
            reason = "external data not loaded"
        if reason:
            rejected.append({"name": name, "reason": reason})
            continue
        kind, trans_b = next(iter(roles))
        rank = len(t.dims)
        if (kind == "embedding" and rank != 2) or (kind == "gemm" and rank != 2) or rank < 2:
            rejected.append({"name": name, "reason": f"{kind} weight of rank {rank}"})
            continue
        weights.append(Weight(name, kind, tuple(i for i, _ in use), trans_b))
    weights.sort(key=lambda w: w.consumers[0])  # graph (topological) order: first/last layer
    return weights, rejected


def weight_role(node: onnx.NodeProto, index: int) -> tuple[str, bool] | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and index == 1:
        return ("matmul", False)
    if node.op_type == "Gemm" and index == 1:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return ("gemm", bool(attrs.get("transB", 0)))
    if node.op_type == "Gather" and index == 0:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        return ("embedding", False) if axis == 0 else None
    return None


def quantize_array(w: np.ndarray, reduce: tuple[int, ...], dtype: type, qmax: int = QMAX
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: ``scale = max|w| / qmax`` over ``reduce`` (kept as size-1 dims, rounded to
    ``dtype`` before use so that ``q * scale`` is exactly what DequantizeLinear computes); values in
    ``[-qmax, qmax]`` (127, or 63 for ``quantize-int8``'s 7-bit weights)."""
    w32 = w.astype(np.float32)
    amax = np.max(np.abs(w32), axis=reduce, keepdims=True)
    scale = (amax / qmax).astype(dtype).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))  # all-zero channel: q = 0 with any scale
    q = np.clip(np.rint(w32 / scale), -qmax, qmax).astype(np.int8)
    return q, scale.astype(dtype)


def weight_errors(w: np.ndarray, q: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    w64 = w.astype(np.float64)
    diff = w64 - q.astype(np.float64) * scale.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    return (float(np.linalg.norm(diff)) / norm if norm else 0.0), float(np.abs(diff).max(initial=0.0))


def nbytes(t: TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def unique_name(name: str, taken: set[str]) -> str:
    out, i = name, 0
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    taken.add(out)
    return out

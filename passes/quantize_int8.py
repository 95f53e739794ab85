"""``quantize-int8`` (ONNX stage): int8 weights *and* int8 activations, integer GEMMs (W8A8 compute).

What ``--precision int8`` runs. A mixer model at a few hundred candidates is compute-bound on CPU
(its per-token GEMMs run at the core's fp32 FMA ceiling), so storing weights in int8 (W8A16) does not
make it faster there; only cheaper arithmetic does. This pass rewrites every ``MatMul``/``Gemm``
whose weight is a float32 initializer into ONNX Runtime's integer GEMM:

    x [.., M, K] float ─► ReduceMax(|x|, last axis) / 127 = s_row [.., M, 1]          (per-row)
                       ─► QuantizeLinear(x, s_row, 128, axis=-1, block_size=K) → uint8
                       ─► com.microsoft MatMulIntegerToFloat(x_u8, W_s8, 1, s_w, 128) [.., M, N]
                       ─► × s_row  (─► + bias for a Gemm)

Weights: symmetric int8 per output channel (2-D ``[K,N]``: scale ``[N]``; per-token ``[T,K,N]``
and any higher rank: one scale per (leading index, channel), ``[T,1,N]``, which
MatMulIntegerToFloat broadcasts; no weight zero point — the stock per-channel zero points are what
ORT refuses for ``[T,K,N]``), in **7 bits** (``[-63, 63]``): ONNX Runtime's u8×s8 kernel on AVX2
without VNNI sums pairs of u8·s8 products in int16 (``vpmaddubsw``), which saturates for
255·127·2 > 32767; with |w| ≤ 63 no pair can (ORT's own ``reduce_range``). Activations: 8 bits,
per row by default (the finest scale one integer GEMM allows: a row is what is summed over).

Measured kernel choices (this repository's README, "--precision int8") decided the form: fused
``MatMulIntegerToFloat`` beats ``MatMulInteger`` + ``Cast`` + ``Mul``; u8×s8 beats u8×u8 and s8×s8;
one blocked ``QuantizeLinear`` (opset 21, one block per row) beats ``Div``/``Round``/``Add``/``Cast``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixexport.bundle import Bundle
from mixexport.errors import BadInputError, PreconditionError
from mixexport.int8_weights import Weight, candidates, nbytes, quantize_array, require_weights, unique_name, weight_errors
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.options import QuantizeInt8Options as Options

#: Weight magnitude bound: 7 bits, so that u8·s8 pair sums fit int16 on AVX2 (see the module doc).
WEIGHT_QMAX = 63
ACT_QMAX = 127     # per-row activations: round(x / s) in [-127, 127], stored + 128 as uint8
ZERO_POINT = 128
MS_DOMAIN = "com.microsoft"
#: Name patterns of the head / towers (``skip_head``), as quantize-w8a16's.
HEAD_PATTERNS = ("head.*", "*.head.*", "*tower*")
#: The ONNX Runtime kernels this pass's graph runs (reported; the README says which MLAS path).
KERNELS = {"per-row": ["Abs", "ReduceMax", "QuantizeLinear (blocked, one block per row)",
                       "MatMulIntegerToFloat (u8 x s8)", "Mul"],
           "per-tensor": ["DynamicQuantizeLinear", "MatMulIntegerToFloat (u8 x s8)"]}


def requires(bundle: Bundle) -> None:
    """ONNX stage, float32 compute, and at least one MatMul/Gemm whose weight (B) is a float32
    initializer."""
    if bundle.stage != "onnx":
        raise PreconditionError(f"quantize-int8 works on ONNX segments; found a {bundle.stage}-stage bundle")
    if bundle.precision != "fp32":
        raise PreconditionError(f"quantize-int8 quantizes a float32 model; found precision {bundle.precision!r}",
                                "use --precision int8 alone (it implies fp32 weights before quantizing)")
    found = []
    for seg in bundle.segments:
        found += [w for w in candidates(seg.onnx)[0]
                  if w.kind != "embedding" and _float32(seg.onnx, w.name)]
    require_weights("quantize-int8", "float32", found, [seg.onnx for seg in bundle.segments])


def quantize_int8(bundle: Bundle, options: Options) -> PassResult:
    """Rewrite MatMul/Gemm with float32 weights into int8 × int8 integer GEMMs (see the module doc).

    Cases handled (every segment; the input bundle's ModelProtos are copied, never changed):

    - ``MatMul(x, W)``, ``W`` a float32 initializer of rank 2 (``[K,N]``, scale ``[N]``) or rank ≥ 3
      (per-token ``[T,K,N]``, packed experts ``[E,T,K,N]``…: scale ``[..,1,N]``), ``x`` of any rank
      that broadcasts against it.
    - ``Gemm(x, W, C)`` with ``transA=0``: ``transB=1`` weights are stored transposed (``[K,N]``),
      ``alpha`` folds into the weight scale, ``beta·C`` is added after.
    - Several MatMuls reading the same ``x`` share one quantization of it.

    Left in float, with the reason in the report: embedding tables, biases, norms; names matching
    ``skip`` (routers by default) or the head when ``skip_head``; weights that are not float32, also
    read by another kind of node, graph inputs/outputs, read inside a subgraph; ``Gemm(transA=1)``;
    MatMuls whose activation input is an initializer too.
    """
    segments, layers, skipped, seg_report = [], [], [], {}
    before = after = 0
    for seg in bundle.segments:
        model = onnx.ModelProto()
        model.CopyFrom(seg.onnx)  # purity: the input bundle's proto is never touched
        b0 = sum(nbytes(t) for t in model.graph.initializer)
        lay, skip = _quantize_model(model, options, seg.name)
        before, after = before + b0, after + sum(nbytes(t) for t in model.graph.initializer)
        layers += lay
        skipped += skip
        seg_report[seg.name] = {"int8_gemms": [x["node"] for x in lay]}
        segments.append(dataclasses.replace(seg, onnx=model))
    if not layers:
        raise BadInputError("quantize-int8: every candidate weight was skipped: "
                            + "; ".join(f"{s['name']} ({s['reason']})" for s in skipped),
                            "relax --option quantize-int8.skip / skip_head")
    errs = [x["weight_rel_error"] for x in layers]
    report = {
        "activations": options.activations, "weight_bits": 7, "activation_bits": 8,
        "kernels": KERNELS[options.activations],
        "initializer_bytes": {"before": before, "after": after, "ratio": after / before if before else 1.0},
        "weight_rel_error": {"max": max(errs), "mean": float(np.mean(errs))},
        "layers": layers, "skipped": skipped, "segments": seg_report,
        "notes": [
            "weights: symmetric int8 in [-63, 63] (7 bits) per output channel, per (token, channel) for "
            "[T,K,N]; weight_rel_error = ||W - dequant(q)||_F / ||W||_F per layer",
            "activations: uint8 with zero point 128, scale max|row|/127 per row (per-row) or "
            "DynamicQuantizeLinear's per tensor, computed at run time",
            "7-bit weights: ONNX Runtime's u8 x s8 kernel on AVX2 without VNNI accumulates pairs in "
            "int16 (vpmaddubsw), which saturates with 8-bit weights",
        ],
    }
    return PassResult(bundle.replace(segments=tuple(segments), precision="int8"), report)


# --------------------------------------------------------------------------------------------

def _float32(model: onnx.ModelProto, name: str) -> bool:
    return any(t.name == name and t.data_type == TensorProto.FLOAT for t in model.graph.initializer)


def _skip_reason(w: Weight, options: Options, model: onnx.ModelProto) -> str | None:
    patterns = options.skip + (HEAD_PATTERNS if options.skip_head else ())
    hit = next((p for p in patterns if fnmatch.fnmatchcase(w.name, p)), None)
    if hit:
        return f"matches skip pattern {hit!r}"
    if not _float32(model, w.name):
        return "not float32 (int8 compute starts from a float32 model)"
    inits = {t.name for t in model.graph.initializer}
    for i in w.consumers:
        node = model.graph.node[i]
        if node.input[0] in inits:
            return "the activation input is a constant too"
        if node.op_type == "Gemm" and _attrs(node).get("transA", 0):
            return "Gemm with transA=1"
    return None


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """New nodes and initializers for one model, with unique names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | \
            {n.name for n in g.node} | {v.name for v in g.input}
        self.inits: list[TensorProto] = []
        self.consts: dict[tuple[str, bytes], str] = {}

    def name(self, base: str) -> str:
        return unique_name(base, self.taken)

    def init(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        """A small shared constant (one initializer per distinct value)."""
        key = (str(value.dtype), value.tobytes() + str(value.shape).encode())
        if key not in self.consts:
            self.consts[key] = self.init(base, value)
        return self.consts[key]

    def node(self, op: str, inputs: list[str], outputs: list[str], base: str, **attrs: Any) -> onnx.NodeProto:
        domain = MS_DOMAIN if op == "MatMulIntegerToFloat" else ""
        return helper.make_node(op, inputs, outputs, self.name(base), domain=domain, **attrs)


def _quantize_activation(x: str, k: int, mode: str, gb: _Graph) -> tuple[list[onnx.NodeProto], list[str], str | None]:
    """Nodes quantizing ``x`` (last axis ``k``); (nodes, [x_u8, a_scale, a_zero_point], row scale or None)."""
    out = gb.name(f"{x}.u8")
    if mode == "per-tensor":
        scale, zp = gb.name(f"{x}.scale"), gb.name(f"{x}.zero_point")
        return [gb.node("DynamicQuantizeLinear", [x], [out, scale, zp], f"{x}_DynamicQuantizeLinear")], \
            [out, scale, zp], None
    absx, amax, s0, rs, shape, zps = (gb.name(f"{x}.{s}") for s in ("abs", "amax", "s0", "row_scale", "scale_shape",
                                                                     "zero_points"))
    zp = gb.const("zp_u8", np.array(ZERO_POINT, np.uint8))
    nodes = [
        gb.node("Abs", [x], [absx], f"{x}_Abs"),
        gb.node("ReduceMax", [absx, gb.const("axes_last", np.array([-1], np.int64))], [amax], f"{x}_ReduceMax",
                keepdims=1),
        gb.node("Mul", [amax, gb.const("inv_127", np.array(1.0 / ACT_QMAX, np.float32))], [s0], f"{x}_Scale"),
        # an all-zero row: any positive scale gives q = 0 (the max keeps the division finite)
        gb.node("Max", [s0, gb.const("tiny", np.array(np.finfo(np.float32).tiny, np.float32))], [rs],
                f"{x}_ScaleFloor"),
        # blocked QuantizeLinear wants a zero point shaped like its scale
        gb.node("Shape", [rs], [shape], f"{x}_ScaleShape"),
        gb.node("Expand", [zp, shape], [zps], f"{x}_ZeroPoints"),
        # one block per row: round(x / s_row) + 128, saturated to uint8, in one pass over x
        gb.node("QuantizeLinear", [x, rs, zps], [out], f"{x}_QuantizeLinear", axis=-1, block_size=k),
    ]
    return nodes, [out, gb.const("one", np.array(1.0, np.float32)), zp], rs


def _quantize_model(model: onnx.ModelProto, options: Options, segment: str
                    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rewrite ``model`` (a private copy) in place; returns (layer reports, skipped weights)."""
    g = model.graph
    weights, rejected = candidates(model)
    skipped = [{"segment": segment, **s} for s in rejected]
    inits = {t.name: t for t in g.initializer}
    gb = _Graph(model)
    before: dict[int, list[onnx.NodeProto]] = {}   # nodes to insert before node i
    replace: dict[int, list[onnx.NodeProto]] = {}  # node i replaced by these
    quantized_x: dict[str, tuple[list[str], str | None]] = {}
    layers, dropped = [], set()
    for w in weights:
        if w.kind == "embedding":
            skipped.append({"segment": segment, "name": w.name, "reason": "embedding table (int8 compute covers GEMMs)"})
            continue
        reason = _skip_reason(w, options, model)
        if reason:
            skipped.append({"segment": segment, "name": w.name, "reason": reason})
            continue
        arr = numpy_helper.to_array(inits[w.name]).astype(np.float32)
        kn = arr.T if (w.kind == "gemm" and w.trans_b) else arr   # [.., K, N]
        q, scale = quantize_array(kn, (kn.ndim - 2,), np.float32, WEIGHT_QMAX)   # scale [.., 1, N]
        rel, max_abs = weight_errors(kn, q, scale)
        q_name = gb.init(f"{w.name}.int8", q)
        dropped.add(w.name)
        for i in w.consumers:
            node = g.node[i]
            x, y = node.input[0], node.output[0]
            if x not in quantized_x:
                nodes, ins, rs = _quantize_activation(x, kn.shape[-2], options.activations, gb)
                before.setdefault(i, []).extend(nodes)
                quantized_x[x] = (ins, rs)
            (xq, a_scale, a_zp), rs = quantized_x[x]
            attrs = _attrs(node) if node.op_type == "Gemm" else {}
            w_scale = scale * np.float32(attrs.get("alpha", 1.0))
            s_name = gb.init(f"{w.name}.scale", (w_scale.reshape(-1) if kn.ndim == 2 else w_scale).astype(np.float32))
            new: list[onnx.NodeProto] = []
            has_c = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
            y0 = gb.name(f"{y}.int") if (rs is not None or has_c) else y
            new.append(gb.node("MatMulIntegerToFloat", [xq, q_name, a_scale, s_name, a_zp], [y0],
                               f"{node.name or y}_MatMulIntegerToFloat"))
            if rs is not None:
                y1 = gb.name(f"{y}.rows") if has_c else y
                new.append(gb.node("Mul", [y0, rs], [y1], f"{node.name or y}_RowScale"))
                y0 = y1
            if has_c:
                c = node.input[2]
                beta = float(attrs.get("beta", 1.0))
                if beta != 1.0:
                    cb = gb.name(f"{c}.beta")
                    new.append(gb.node("Mul", [c, gb.const("beta", np.array(beta, np.float32))], [cb], f"{c}_Beta"))
                    c = cb
                new.append(gb.node("Add", [y0, c], [y], f"{node.name or y}_Bias"))
            replace[i] = new
            layers.append({"segment": segment, "node": node.name or y, "op": node.op_type, "weight": w.name,
                           "int8": q_name, "scale": s_name, "shape": list(arr.shape), "scale_shape": list(scale.shape),
                           "weight_rel_error": rel, "weight_max_abs_error": max_abs})
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(g.node):
        nodes += before.get(i, []) + replace.get(i, [node])
    g.ClearField("node")
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in dropped]
    g.ClearField("initializer")
    g.initializer.extend(kept + gb.inits)
    if layers and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return layers, skipped


def ensures(before: Bundle, after: Bundle, options: Options) -> dict[str, Any] | None:
    """Every segment keeps its graph inputs and outputs, and every weight the report lists is an int8
    initializer read by a MatMulIntegerToFloat."""
    from mixexport.errors import PostconditionError

    for b, a in zip(before.segments, after.segments):
        io = lambda m: ([v.name for v in m.graph.input], [v.name for v in m.graph.output])  # noqa: E731
        if io(b.onnx) != io(a.onnx):
            raise PostconditionError(f"quantize-int8 changed segment {a.name!r}'s inputs or outputs")
        int8 = {t.name for t in a.onnx.graph.initializer if t.data_type == TensorProto.INT8}
        read = {n.input[1] for n in a.onnx.graph.node if n.op_type == "MatMulIntegerToFloat"}
        if not read <= int8:
            raise PostconditionError(f"quantize-int8: segment {a.name!r} has integer GEMMs whose weight is not "
                                     f"an int8 initializer: {sorted(read - int8)[:3]}")
    return None


PASS = PassInfo(name="quantize-int8", stage="onnx", run=quantize_int8, options=Options, requires=requires,
                ensures=ensures)

"""Small float ONNX models with every weight layout ``quantize-w8a16`` handles, and a numpy
DequantizeLinear to build float references from the pass's own int8 weights and scales."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixexport.bundle import Bundle, Segment
from mixexport.source import Source

K, N, T, R, E = 64, 48, 4, 30, 16


def float_model(seed: int = 0, *, opset: int = 21) -> onnx.ModelProto:
    """x [b,K] through a 2-D MatMul, Gemm(transB=1) + bias, Gemm(transB=0) and a router MatMul;
    x3 [T,b,K] through a per-token MatMul [T,K,N]; ids [b,3] through an embedding Gather."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> TensorProto:
        # rows/channels of different magnitudes, so per-channel and per-tensor scales differ
        return numpy_helper.from_array((rng.standard_normal(shape) * rng.uniform(0.1, 2.0, shape[-1])
                                        ).astype(np.float32), name)

    inits = [w("mm.weight", K, N), w("gemm_t.weight", N, K), w("gemm_t.bias", N), w("gemm_n.weight", K, N),
             w("tok.weight", T, K, N), w("table.weight", R, E), w("router.weight", K, 4)]
    nodes = [
        helper.make_node("MatMul", ["x", "mm.weight"], ["y_mm"], "mm"),
        helper.make_node("Gemm", ["x", "gemm_t.weight", "gemm_t.bias"], ["y_gemm_t"], "gemm_t", transB=1),
        helper.make_node("Gemm", ["x", "gemm_n.weight"], ["y_gemm_n"], "gemm_n", transB=0),
        helper.make_node("MatMul", ["x3", "tok.weight"], ["y_tok"], "tok"),
        helper.make_node("Gather", ["table.weight", "ids"], ["y_emb"], "emb", axis=0),
        helper.make_node("MatMul", ["x", "router.weight"], ["y_router"], "router"),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "w8a16_layouts",
        [helper.make_tensor_value_info("x", f, ["b", K]), helper.make_tensor_value_info("x3", f, [T, "b", K]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 3])],
        [helper.make_tensor_value_info("y_mm", f, ["b", N]), helper.make_tensor_value_info("y_gemm_t", f, ["b", N]),
         helper.make_tensor_value_info("y_gemm_n", f, ["b", N]), helper.make_tensor_value_info("y_tok", f, [T, "b", N]),
         helper.make_tensor_value_info("y_emb", f, ["b", 3, E]), helper.make_tensor_value_info("y_router", f, ["b", 4])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(seed: int = 1, batch: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, K)).astype(np.float32),
            "x3": rng.standard_normal((T, batch, K)).astype(np.float32),
            "ids": rng.integers(0, R, (batch, 3)).astype(np.int64)}


def bundle_of(model: onnx.ModelProto, source: Source) -> Bundle:
    return Bundle(source=source, stage="onnx", segments=(Segment("model", "full", (), (), onnx=model),))


def dequantize(q: np.ndarray, scale: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """ONNX DequantizeLinear (no zero point), in float32 like ONNX Runtime."""
    q = q.astype(np.float32)
    scale = scale.astype(np.float32)
    if scale.ndim == 0:
        return q * scale
    axis = attrs.get("axis", 1) % q.ndim
    if attrs.get("block_size"):
        return q * np.repeat(scale, attrs["block_size"], axis=axis)[tuple(slice(0, d) for d in q.shape)]
    shape = [1] * q.ndim
    shape[axis] = -1
    return q * scale.reshape(shape)


def dequantized_reference(original: onnx.ModelProto, quantized: onnx.ModelProto,
                          layers: list[dict[str, Any]]) -> onnx.ModelProto:
    """``original`` with every quantized weight replaced by ``dequantize(int8, scale)`` in float."""
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    ref = onnx.ModelProto()
    ref.CopyFrom(original)
    for layer in layers:
        q, s = inits[layer["int8"]], inits[layer["scale"]]
        if layer["kind"] == "embedding":  # per-row [R,1] or per-column [E] both broadcast on the table
            w = q.astype(np.float32) * (s if s.ndim == 2 else s.reshape(1, -1))
        else:
            w = dequantize(q, s, layer["dequantize"])
        for t in ref.graph.initializer:
            if t.name == layer["name"]:  # float32 product, rounded once to the weight's dtype
                t.CopyFrom(numpy_helper.from_array(w.astype(helper.tensor_dtype_to_np_dtype(t.data_type)), t.name))
    return ref


def run_ort(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
            options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    from mixexport.backends.onnxruntime import OnnxRuntimeBackend

    with OnnxRuntimeBackend().open_bytes(model.SerializeToString(), options) as sess:
        return sess.run(inputs)

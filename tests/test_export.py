"""torch.export → ONNX: named dims, opset 21, full checker, external data past the threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from mixexport.export import OPSET, load_onnx, save_onnx, to_onnx, weight_bytes
from mixexport.source import export_program, load_source


def test_export_names_dims_and_saves_external_data(tiny_ckpt: Path, tmp_path: Path) -> None:
    source = load_source(tiny_ckpt)
    program = export_program(source)
    feeds = source.example_feeds(5)
    model = to_onnx(program, source.inputs, source.outputs, feeds)
    assert model.opset_import[0].version == OPSET
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"user_cat": ["batch", 5], "item_cat": ["batch", 2], "item_dense": ["batch", 19],
                    "seq_items": ["batch", 16]}
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", 1]

    small = save_onnx(model, tmp_path / "small.onnx")
    assert small == [tmp_path / "small.onnx"]
    ext = save_onnx(model, tmp_path / "big.onnx", external_threshold=1024)  # force external data
    assert ext == [tmp_path / "big.onnx", tmp_path / "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 0.2 * (tmp_path / "big.onnx.data").stat().st_size
    assert weight_bytes(load_onnx(tmp_path / "big.onnx", with_weights=False)) == weight_bytes(model)
    onnx.checker.check_model(str(tmp_path / "big.onnx"), full_check=True)
    # the in-memory model was not converted to external data by saving
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)

    other = source.example_feeds(33, seed=9)
    want = source.reference(other)["logit"]
    for path in ext[:1] + small:
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, other)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

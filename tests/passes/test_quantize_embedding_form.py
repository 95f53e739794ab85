"""quantize-w8a16's ``embedding_form=dequantize-first`` (TensorRT's pattern: DequantizeLinear straight on
the int8 table, then Gather): structure, exact equality with the gather-first form on ONNX Runtime, the
int8 survival check accepting it, and the float twin the TensorRT backends weigh int8 engines against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from mixexport.backends.trt_build import dequantized_twin
from mixexport.bundle import Bundle
from mixexport.errors import BadInputError
from mixexport.passes.quantize_w8a16 import Options, quantize_w8a16
from mixexport.pipeline import initial_bundle, to_onnx_stage
from mixexport.source import load_source
from mixexport.verification.int8 import survival_report
from tests import w8a16_models as wm


@pytest.fixture(scope="module")
def rm_bundle(tiny_ckpt: Path) -> Bundle:
    source = load_source(tiny_ckpt)
    return to_onnx_stage(initial_bundle(source), source.example_request(2, 16))


@pytest.mark.parametrize("embeddings", ["per-column", "per-row"])
def test_dequantize_first_reads_the_int8_table_directly(rm_bundle: Bundle, tiny_ckpt: Path, embeddings: str) -> None:
    first = quantize_w8a16(rm_bundle, Options(embeddings=embeddings, embedding_form="dequantize-first"))
    gathered = quantize_w8a16(rm_bundle, Options(embeddings=embeddings))
    model = first.bundle.segments[0].onnx
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    tables = [x for x in first.report["layers"] if x["kind"] == "embedding"]
    assert tables and first.report["embedding_form"] == "dequantize-first"
    for layer in tables:
        readers = [n for n in model.graph.node if layer["int8"] in n.input]
        (dq,) = readers  # only a DequantizeLinear reads the int8 constant: what TensorRT accepts
        assert dq.op_type == "DequantizeLinear" and dq.input[0] == layer["int8"]
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        rows, width = layer["shape"]
        axis = next(onnx.helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis")
        assert (axis, scale.shape) == ((0, (rows,)) if embeddings == "per-row" else (1, (width,)))
        gathers = [n for n in model.graph.node if dq.output[0] in n.input]
        assert gathers and all(g.op_type == "Gather" and g.input[0] == dq.output[0] for g in gathers)
        assert all(producers.get(g.input[1]) is None or producers[g.input[1]].op_type != "DequantizeLinear"
                   for g in gathers)
    # the same int8 values and scales, so both forms compute the same numbers
    feeds = load_source(tiny_ckpt).example_feeds(13, seed=3)
    a = wm.run_ort(model, feeds)["logit"]
    b = wm.run_ort(gathered.bundle.segments[0].onnx, feeds)["logit"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())
    # and ONNX Runtime keeps the int8 table (the survival check accepts this form)
    report = survival_report(model, {"graph_optimization_level": "ORT_ENABLE_ALL"})
    assert report["status"] == "PASS", report["failures"]


def test_unknown_embedding_form_is_refused(rm_bundle: Bundle) -> None:
    with pytest.raises(BadInputError, match="embedding_form"):
        quantize_w8a16(rm_bundle, Options(embedding_form="gather-last"))


def test_dequantized_twin_is_the_float_model_the_int8_one_computes(rm_bundle: Bundle, tiny_ckpt: Path) -> None:
    """The twin has no int8 left and computes exactly what the W8A16 graph computes."""
    for form in ("dequantize-first", "gather-first"):
        q = quantize_w8a16(rm_bundle, Options(embedding_form=form)).bundle.segments[0].onnx
        twin, count = dequantized_twin(q)
        onnx.checker.check_model(twin, full_check=True)
        assert not any(t.data_type == onnx.TensorProto.INT8 for t in twin.graph.initializer) or form == "gather-first"
        assert count == sum(n.op_type == "DequantizeLinear" for n in q.graph.node) - sum(
            n.op_type == "DequantizeLinear" for n in twin.graph.node)
        feeds = load_source(tiny_ckpt).example_feeds(9, seed=4)
        got, want = wm.run_ort(twin, feeds)["logit"], wm.run_ort(q, feeds)["logit"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())

"""quantize-w8a16: structure, numerics (vs a dequantized float reference and vs eager), precondition,
granularity and skip options (purity: test_purity.py) — on real exports of the tiny rankmixer and on small ONNX
models that hold every weight layout the pass handles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixexport.bundle import Bundle
from mixexport.errors import BadInputError, PreconditionError
from mixexport.passes.quantize_w8a16 import PASS, Options, quantize_w8a16, requires
from mixexport.pipeline import initial_bundle, stage_runtime, to_onnx_stage
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.verification.compare import compare_outputs, resolve_tolerances
from tests import w8a16_models as wm

GEMMS = ("MatMul", "Gemm")


@pytest.fixture(scope="module")
def rm_bundle(tiny_ckpt: Path) -> Bundle:
    """The ONNX-stage bundle of the tiny rankmixer (real torch.export + dynamo ONNX export)."""
    source = load_source(tiny_ckpt)
    return to_onnx_stage(initial_bundle(source), source.example_request(2, 16))


@pytest.fixture(scope="module")
def rm_quantized(rm_bundle: Bundle):
    return quantize_w8a16(rm_bundle, Options())


def _graph(model: onnx.ModelProto):
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    return inits, producers


def _dq_of(model: onnx.ModelProto, weight: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == weight)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_every_weight_gemm_reads_dequantize_of_int8_directly(rm_bundle: Bundle, rm_quantized) -> None:
    model = rm_quantized.bundle.segments[0].onnx
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    inits, producers = _graph(model)
    gemms = [n for n in model.graph.node if n.op_type in GEMMS]
    assert len(gemms) == 8  # embed.dense, tokenizer, 2 x (fc1, fc2), 2 tower layers
    for node in gemms:
        assert node.input[1] not in inits, f"{node.name} still reads a float weight initializer"
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear", f"{node.name} B comes from {dq.op_type}, not DequantizeLinear"
        assert len(dq.input) == 2  # no zero point: symmetric
        assert inits[dq.input[0]].data_type == TensorProto.INT8
        assert inits[dq.input[1]].data_type == TensorProto.FLOAT  # scale in the compute dtype
    a = {n.output[0]: _attrs(n) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    s = {n.output[0]: list(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "DequantizeLinear"
         and n.input[0] in inits}
    assert (s["blocks.0.ffn.fc1.weight"], a["blocks.0.ffn.fc1.weight"]) == ([8, 1, 256], {"axis": 1, "block_size": 64})
    assert (s["blocks.1.ffn.fc2.weight"], a["blocks.1.ffn.fc2.weight"]) == ([8, 1, 64], {"axis": 1, "block_size": 256})
    assert (s["tokenizer.weight"], a["tokenizer.weight"]) == ([8, 1, 64], {"axis": 1, "block_size": 18})
    assert (s["head.towers.0.0.weight"], a["head.towers.0.0.weight"]) == ([32], {"axis": 0})  # Gemm transB=1
    # embeddings: Gather of int8 rows, then DequantizeLinear with the per-column scale
    for g in (n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
              and inits[n.input[0]].data_type == TensorProto.INT8):
        assert len(inits[g.input[0]].dims) == 2
        reader = next(n for n in model.graph.node if g.output[0] in n.input)
        assert reader.op_type == "DequantizeLinear" and list(inits[reader.input[1]].dims) == [16]
    assert model.graph.node and rm_quantized.bundle.precision == "w8a16"
    # the original float weights are gone; biases and norms stay float
    names = {t.name for t in model.graph.initializer}
    assert "blocks.0.ffn.fc1.weight" not in names and "blocks.0.ffn.fc1.bias" in names
    assert inits["blocks.0.ffn.fc1.bias"].data_type == TensorProto.FLOAT


def test_every_layout_and_granularity(tiny_ckpt: Path) -> None:
    source = load_source(tiny_ckpt)
    model = wm.float_model()
    cases = {  # granularity -> weight -> (scale shape, DequantizeLinear attributes)
        "per-token-channel": {"mm.weight": ([48], {"axis": 1}), "gemm_t.weight": ([48], {"axis": 0}),
                              "gemm_n.weight": ([48], {"axis": 1}),
                              "tok.weight": ([4, 1, 48], {"axis": 1, "block_size": 64})},
        "per-channel": {"mm.weight": ([48], {"axis": 1}), "tok.weight": ([48], {"axis": 2})},
        "per-tensor": {"mm.weight": ([], {}), "gemm_t.weight": ([], {}), "tok.weight": ([], {})},
    }
    for gran, want in cases.items():
        out = quantize_w8a16(wm.bundle_of(model, source), Options(granularity=gran)).bundle.segments[0].onnx
        onnx.checker.check_model(out, full_check=True)
        inits, producers = _graph(out)
        for weight, (shape, attrs) in want.items():
            dq = _dq_of(out, weight)
            assert (list(inits[dq.input[1]].dims), _attrs(dq)) == (shape, attrs), (gran, weight)
    for emb, shape, attrs, gathers in (("per-row", [30, 1], {"axis": -1, "block_size": 16}, 2),
                                       ("per-column", [16], {"axis": -1}, 1)):
        out = quantize_w8a16(wm.bundle_of(model, source), Options(embeddings=emb)).bundle.segments[0].onnx
        inits, producers = _graph(out)
        dq = producers["y_emb"]
        assert dq.op_type == "DequantizeLinear" and _attrs(dq) == attrs
        scale = inits.get(dq.input[1]) or inits[producers[dq.input[1]].input[0]]
        assert list(scale.dims) == shape
        assert sum(n.op_type == "Gather" for n in out.graph.node) == gathers


def test_ort_equals_the_dequantized_float_reference(tiny_ckpt: Path, rm_bundle: Bundle, rm_quantized) -> None:
    """The int8 graph computes exactly the float model whose weights are dequant(int8, scale)."""
    source = load_source(tiny_ckpt)
    for gran in ("per-token-channel", "per-channel", "per-tensor"):
        for emb in ("per-row", "per-column"):
            original = wm.float_model()
            res = quantize_w8a16(wm.bundle_of(original, source), Options(granularity=gran, embeddings=emb))
            got = wm.run_ort(res.bundle.segments[0].onnx, wm.feeds())
            want = wm.run_ort(wm.dequantized_reference(original, res.bundle.segments[0].onnx,
                                                       res.report["layers"]), wm.feeds())
            unquantized = wm.run_ort(original, wm.feeds())
            for name in want:
                scale = np.abs(want[name]).max()
                np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * scale, err_msg=f"{gran} {name}")
                if name != "y_router":  # skipped by default: the only output int8 must not change
                    assert np.abs(unquantized[name] - want[name]).max() > 1e-4 * scale, (gran, name)
    original = rm_bundle.segments[0].onnx
    feeds = source.example_feeds(19, seed=5)
    got = wm.run_ort(rm_quantized.bundle.segments[0].onnx, feeds)["logit"]
    want = wm.run_ort(wm.dequantized_reference(original, rm_quantized.bundle.segments[0].onnx,
                                               rm_quantized.report["layers"]), feeds)["logit"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_close_to_eager_within_w8a16_tolerance(tiny_ckpt: Path, rm_quantized) -> None:
    source = load_source(tiny_ckpt)
    req = source.example_request(3, 16, seed=11)
    with stage_runtime(rm_quantized.bundle) as rt, Runtime.reference(source) as ref:
        got, want = rt.score(req), ref.score(req)
    per, default = resolve_tolerances(list(want), "w8a16", {}, {})
    (res,) = compare_outputs(got, want, per, default)
    assert res.passed, res.line()
    assert 1e-5 < res.max_rel < 0.02, res.line()  # int8 weights do change the logits, a little


def test_precondition_names_what_it_expected_and_found(tiny_ckpt: Path, rm_quantized) -> None:
    source = load_source(tiny_ckpt)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    acts = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(PreconditionError) as e:
        requires(wm.bundle_of(acts, source))
    assert e.value.message == ("quantize-w8a16 expected at least one MatMul/Gemm whose weight (B) input is a "
                               "float initializer; found MatMul/Gemm B inputs that are activations")
    with pytest.raises(PreconditionError, match="found MatMul/Gemm B inputs that are activations"):
        requires(rm_quantized.bundle)  # running it twice: the weights are already int8
    with pytest.raises(PreconditionError, match=r"needs ONNX opset >= 21 .* has opset 17"):
        requires(wm.bundle_of(wm.float_model(opset=17), source))
    requires(wm.bundle_of(wm.float_model(), source))  # applies
    assert PASS.requires is requires and PASS.stage == "onnx" and PASS.name == "quantize-w8a16"


def test_granularity_changes_scales_and_reported_error(rm_bundle: Bundle, rm_quantized) -> None:
    runs = {g: quantize_w8a16(rm_bundle, Options(granularity=g)) for g in ("per-channel", "per-tensor")}
    runs["per-token-channel"] = rm_quantized
    shapes, errors = {}, {}
    for gran, res in runs.items():
        model = res.bundle.segments[0].onnx
        inits, _ = _graph(model)
        shapes[gran] = list(inits[_dq_of(model, "blocks.0.ffn.fc1.weight").input[1]].dims)
        layer = next(x for x in res.report["layers"] if x["name"] == "blocks.0.ffn.fc1.weight")
        assert res.report["granularity"] == gran == layer["granularity"]
        errors[gran] = layer["rel_error"]
        # the report prices every granularity whichever one ran, and agrees with the one that ran
        assert layer["rel_error_by_granularity"][gran] == pytest.approx(layer["rel_error"])
    assert shapes == {"per-token-channel": [8, 1, 256], "per-channel": [256], "per-tensor": []}
    assert errors["per-token-channel"] < errors["per-channel"] < errors["per-tensor"] < 0.05
    summary = rm_quantized.report["error_by_granularity"]
    assert summary["per-token-channel"]["mean_rel_error"] < summary["per-tensor"]["mean_rel_error"]


def test_report_counts_bytes_per_kind(rm_bundle: Bundle, rm_quantized) -> None:
    wb = rm_quantized.report["weight_bytes"]
    before, after = wb["before"], wb["after"]
    assert before["total"] == sum(v for k, v in before.items() if k != "total")
    assert after["total"] == sum(v for k, v in after.items() if k != "total")
    assert after["gemm_int8"] * 4 == before["gemm"]          # every GEMM weight: 4 bytes -> 1 byte
    assert after["embedding_int8"] * 4 == before["embedding"]
    assert after["other"] == before["other"]                  # biases, norms, constants untouched
    assert wb["ratio"] == pytest.approx(after["total"] / before["total"]) and wb["ratio"] < 0.3
    assert rm_quantized.report["ort_session_config"]["session.qdq_matmulnbits_accuracy_level"] == "0"


def test_skip_options(tiny_ckpt: Path, rm_bundle: Bundle) -> None:
    source = load_source(tiny_ckpt)

    def kept_float(bundle: Bundle, **kw: object) -> set[str]:
        res = quantize_w8a16(bundle, Options(**kw))  # type: ignore[arg-type]
        inits = {t.name: t for t in res.bundle.segments[0].onnx.graph.initializer}
        skipped = {s["name"] for s in res.report["skipped"]}
        floats = {n for n, t in inits.items() if t.data_type == TensorProto.FLOAT and n.endswith(".weight")}
        assert floats >= skipped
        return skipped

    synthetic = wm.bundle_of(wm.float_model(), source)
    res = quantize_w8a16(synthetic, Options())
    assert res.report["skipped"] == [{"segment": "model", "name": "router.weight",
                                      "reason": "matches skip pattern '*router*'"}]
    assert kept_float(synthetic, skip=()) == set()
    assert kept_float(rm_bundle) == set()
    assert kept_float(rm_bundle, skip=("blocks.0.*",)) == {"blocks.0.ffn.fc1.weight", "blocks.0.ffn.fc2.weight"}
    assert kept_float(rm_bundle, skip_head=True) == {"head.towers.0.0.weight", "head.towers.0.2.weight"}
    assert kept_float(rm_bundle, skip_first=True, skip_last=True) == {"embed.dense.weight", "head.towers.0.2.weight"}
    assert kept_float(rm_bundle, embeddings="float") == {"embed.user_table.weight", "embed.item_table.weight",
                                                         "embed.seq_table.weight"}
    with pytest.raises(BadInputError, match="every candidate weight was skipped"):
        quantize_w8a16(synthetic, Options(skip=("*",)))
    with pytest.raises(BadInputError, match="unknown granularity 'per-row'"):
        quantize_w8a16(synthetic, Options(granularity="per-row"))


def test_shared_and_non_weight_uses_stay_float(tiny_ckpt: Path) -> None:
    """A weight also read by a non-GEMM node is left float (with the reason), not half-rewritten."""
    model = wm.float_model()
    model.graph.node.append(helper.make_node("Identity", ["mm.weight"], ["w_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [wm.K, wm.N]))
    res = quantize_w8a16(wm.bundle_of(model, load_source(tiny_ckpt)), Options())
    reasons = {s["name"]: s["reason"] for s in res.report["skipped"]}
    assert reasons["mm.weight"] == "also read by a node that is not a MatMul/Gemm weight or Gather table input"
    out = res.bundle.segments[0].onnx
    onnx.checker.check_model(out, full_check=True)
    assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "mm.weight")).dtype == np.float32


def test_float16_weights_get_float16_scales(tiny_ckpt: Path) -> None:
    """The scale carries the compute dtype, so a float16 graph stays float16 end to end."""
    rng = np.random.default_rng(3)
    f16 = TensorProto.FLOAT16
    weights = [numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float16), "w2"),
               numpy_helper.from_array(rng.standard_normal((4, 64, 48)).astype(np.float16), "w3")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w2"], ["y"]), helper.make_node("MatMul", ["x3", "w3"], ["y3"])], "f16",
        [helper.make_tensor_value_info("x", f16, ["b", 64]), helper.make_tensor_value_info("x3", f16, [4, "b", 64])],
        [helper.make_tensor_value_info("y", f16, ["b", 48]), helper.make_tensor_value_info("y3", f16, [4, "b", 48])],
        weights)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    res = quantize_w8a16(wm.bundle_of(original, load_source(tiny_ckpt)), Options())
    out = res.bundle.segments[0].onnx
    onnx.checker.check_model(out, full_check=True)
    inits, _ = _graph(out)
    assert [(inits[n].data_type, list(inits[n].dims)) for n in ("w2.scale", "w3.scale")] == [(f16, [48]), (f16, [4, 1, 48])]
    feeds = {"x": rng.standard_normal((3, 64)).astype(np.float16), "x3": rng.standard_normal((4, 3, 64)).astype(np.float16)}
    got = wm.run_ort(out, feeds)
    want = wm.run_ort(wm.dequantized_reference(original, out, res.report["layers"]), feeds)
    for name in want:
        assert got[name].dtype == np.float16
        np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), rtol=0,
                                   atol=2e-3 * float(np.abs(want[name]).max()))


def test_bfloat16_weights_get_bfloat16_scales(tiny_ckpt: Path) -> None:
    """bf16 graphs (GPU targets; ORT CPU has no bf16 kernels) checked with ONNX's reference runtime."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(4)
    bf16 = TensorProto.BFLOAT16
    w3 = numpy_helper.from_array(rng.standard_normal((4, 64, 48)).astype(ml_dtypes.bfloat16), "w3")
    graph = helper.make_graph([helper.make_node("MatMul", ["x3", "w3"], ["y3"])], "bf16",
                              [helper.make_tensor_value_info("x3", bf16, [4, "b", 64])],
                              [helper.make_tensor_value_info("y3", bf16, [4, "b", 48])], [w3])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    res = quantize_w8a16(wm.bundle_of(original, load_source(tiny_ckpt)), Options())
    out = res.bundle.segments[0].onnx
    onnx.checker.check_model(out, full_check=True)
    inits, _ = _graph(out)
    assert (inits["w3.scale"].data_type, list(inits["w3.scale"].dims)) == (bf16, [4, 1, 48])
    x = {"x3": rng.standard_normal((4, 3, 64)).astype(ml_dtypes.bfloat16)}
    got = ReferenceEvaluator(out).run(None, x)[0].astype(np.float32)
    want = ReferenceEvaluator(wm.dequantized_reference(original, out, res.report["layers"])).run(None, x)[0]
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=0,
                               atol=1e-2 * float(np.abs(want.astype(np.float32)).max()))

"""quantize-int8: structure, numerics (vs an int8 reference computed in numpy from the pass's own
weights, and vs eager), Gemm attributes, skip options and preconditions (purity: test_purity.py) — on
the real export of the tiny rankmixer and on the small ONNX model holding every weight layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixexport.bundle import Bundle
from mixexport.errors import BadInputError, PreconditionError
from mixexport.passes.quantize_int8 import PASS, WEIGHT_QMAX, Options, quantize_int8, requires
from mixexport.pipeline import initial_bundle, stage_runtime, to_onnx_stage
from mixexport.runtime import Runtime
from mixexport.source import Source, load_source
from mixexport.verification.compare import compare_outputs, resolve_tolerances
from tests import w8a16_models as wm


@pytest.fixture(scope="module")
def source(tiny_ckpt: Path) -> Source:
    return load_source(tiny_ckpt)


@pytest.fixture(scope="module")
def rm_bundle(source: Source) -> Bundle:
    return to_onnx_stage(initial_bundle(source), source.example_request(2, 16))


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_rankmixer_every_weight_gemm_becomes_an_integer_gemm(rm_bundle: Bundle) -> None:
    result = quantize_int8(rm_bundle, Options())
    model = result.bundle.segments[0].onnx
    onnx.checker.check_model(model)
    inits = {t.name: t for t in model.graph.initializer}
    assert not [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    mm = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(mm) == 8 == len(result.report["layers"])  # embed.dense, tokenizer, 2 x (fc1, fc2), 2 tower layers
    for node in mm:
        w = numpy_helper.to_array(inits[node.input[1]])
        assert inits[node.input[1]].data_type == TensorProto.INT8 and np.abs(w).max() <= WEIGHT_QMAX
        assert numpy_helper.to_array(inits[node.input[4]]) == 128  # activation zero point (u8 x s8)
    scales = {x["weight"]: x["scale_shape"] for x in result.report["layers"]}
    assert scales["blocks.0.ffn.fc1.weight"] == [8, 1, 256]   # per (token, output channel)
    assert result.bundle.precision == "int8" and result.report["activations"] == "per-row"
    assert result.report["initializer_bytes"]["ratio"] < 0.5
    assert any(s["reason"].startswith("embedding table") for s in result.report["skipped"])


@pytest.mark.parametrize("activations", ["per-row", "per-tensor"])
def test_rankmixer_matches_eager_within_int8_tolerance(rm_bundle: Bundle, source: Source, activations: str) -> None:
    result = quantize_int8(rm_bundle, Options(activations=activations))
    request = source.example_request(3, 64, seed=5)
    with stage_runtime(result.bundle) as rt, Runtime.reference(source) as ref:
        res = compare_outputs(rt.score(request), ref.score(request), *resolve_tolerances(["logit"], "int8", {}, {}))
    assert all(r.passed for r in res), [r.line() for r in res]
    assert 0 < res[0].max_rel < 0.1 and res[0].cosine > 0.99


def _int8_reference(x: np.ndarray, w: np.ndarray, per_row: bool) -> np.ndarray:
    """What the rewritten graph computes, in numpy (float64), from the float weight."""
    ws = np.abs(w).max(axis=-2, keepdims=True).astype(np.float32) / WEIGHT_QMAX
    wq = np.clip(np.rint(w / ws), -WEIGHT_QMAX, WEIGHT_QMAX)
    if per_row:
        xs = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), np.finfo(np.float32).tiny)
        xq = np.rint(x / xs)
    else:  # DynamicQuantizeLinear: asymmetric uint8 over [min(x, 0), max(x, 0)]
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        xs = np.float32((hi - lo) / 255)
        zp = np.clip(np.rint(-lo / xs), 0, 255)
        xq = np.clip(np.rint(x / xs) + zp, 0, 255) - zp
    return (xq.astype(np.float64) @ wq.astype(np.float64)) * ws * xs


@pytest.mark.parametrize("activations", ["per-row", "per-tensor"])
def test_layouts_compute_the_int8_product(source: Source, activations: str) -> None:
    """2-D MatMul, per-token [T,K,N] MatMul, Gemm transB=1 + bias, Gemm transB=0: each output equals
    the int8 x int8 product of the quantized input and weight (to float32 rounding); the router
    stays float (default skip) and the embedding Gather is untouched."""
    model = wm.float_model()
    result = quantize_int8(wm.bundle_of(model, source), Options(activations=activations))
    q = result.bundle.segments[0].onnx
    feeds = wm.feeds(batch=7)
    got = dict(zip([o.name for o in q.graph.output], _session(q).run(None, feeds)))
    want = dict(zip([o.name for o in model.graph.output], _session(model).run(None, feeds)))
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    per_row = activations == "per-row"
    refs = {"y_mm": _int8_reference(feeds["x"], w["mm.weight"], per_row),
            "y_gemm_t": _int8_reference(feeds["x"], w["gemm_t.weight"].T, per_row) + w["gemm_t.bias"],
            "y_gemm_n": _int8_reference(feeds["x"], w["gemm_n.weight"], per_row),
            "y_tok": _int8_reference(feeds["x3"], w["tok.weight"], per_row)}
    for name, ref in refs.items():
        scale = np.abs(ref).max()
        assert np.abs(got[name] - ref).max() <= 1e-5 * scale, name
        assert np.abs(got[name] - want[name]).max() > 1e-6 * scale, f"{name} was not quantized"
    np.testing.assert_array_equal(got["y_router"], want["y_router"])
    np.testing.assert_array_equal(got["y_emb"], want["y_emb"])
    assert {s["name"]: s["reason"] for s in result.report["skipped"]}["router.weight"] == "matches skip pattern '*router*'"


def test_gemm_alpha_beta_fold(source: Source) -> None:
    rng = np.random.default_rng(0)
    w, c = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], "g", transB=1, alpha=0.5, beta=2.0)], "gemm",
        [helper.make_tensor_value_info("x", f, ["b", 5])], [helper.make_tensor_value_info("y", f, ["b", 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    q = quantize_int8(wm.bundle_of(model, source), Options()).bundle.segments[0].onnx
    x = rng.standard_normal((4, 5)).astype(np.float32)
    ref = 0.5 * _int8_reference(x, w.T, True) + 2.0 * c
    np.testing.assert_allclose(_session(q).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-5)


def test_skip_head_keeps_towers_float(rm_bundle: Bundle) -> None:
    result = quantize_int8(rm_bundle, Options(skip_head=True))
    kept = {s["name"] for s in result.report["skipped"] if "skip pattern" in s["reason"]}
    assert kept and all(n.startswith("head.") for n in kept)
    assert len(result.report["layers"]) == 6


def test_preconditions_say_what_was_found(rm_bundle: Bundle, source: Source) -> None:
    program = initial_bundle(source)
    with pytest.raises(PreconditionError, match="works on ONNX segments; found a program-stage bundle"):
        requires(program)
    with pytest.raises(PreconditionError, match="quantizes a float32 model; found precision 'w8a16'"):
        requires(rm_bundle.replace(precision="w8a16"))
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "act",
                              [helper.make_tensor_value_info("a", f, [2, 3]), helper.make_tensor_value_info("b", f, [3, 2])],
                              [helper.make_tensor_value_info("y", f, [2, 2])])
    act = wm.bundle_of(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), source)
    with pytest.raises(PreconditionError, match="found MatMul/Gemm B inputs that are activations"):
        requires(act)
    with pytest.raises(BadInputError, match="every candidate weight was skipped"):
        quantize_int8(rm_bundle, Options(skip=("*",)))
    assert PASS.name == "quantize-int8" and PASS.stage == "onnx"


def test_precision_int8_build_verifies_auc_and_ranking_on_movielens(ml_ckpt: Path, tmp_path: Path) -> None:
    """``--precision int8`` end to end on a model trained on MovieLens: the manifest records int8
    and the pass, verify gates |ΔAUC| and the mean Kendall tau, the ledger shows the pass's error."""
    from tests.cli_helpers import run_cli

    out = tmp_path / "q"
    r = run_cli("build", str(ml_ckpt), "--precision", "int8", "--no-bench", "--out", str(out), "--json")
    assert r.code == 0, r.err
    parity = json.loads(r.out)["parity"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and [p["name"] for p in manifest["passes"]] == ["quantize-int8"]
    gate = parity["metrics"]["gate"]
    assert gate["passed"] and gate["max_abs_delta_auc"] == 1e-3 and gate["min_kendall_tau_mean"] == 0.98
    assert abs(parity["metrics"]["auc"]["delta"]) <= 1e-3 and parity["metrics"]["ranking"]["kendall_tau_mean"] >= 0.98
    ledger = {row["stage"]: row["outputs"][0]["max_rel"] for row in parity["ledger"]}
    assert ledger["onnx export"] < 1e-5 < ledger["pass quantize-int8"] < 0.1  # the error is the pass's

"""Int8 survival: real ONNX Runtime sessions build the optimized graph; the check must pass on the
pinned options and catch every way ORT loses W8A16 (folding to float, MatMulNBits, W8A8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from mixexport.backends.onnxruntime import DEFAULT_OPTIONS
from mixexport.bundle import read_manifest
from mixexport.errors import BadInputError, GateFailedError
from mixexport.passes.quantize_w8a16 import Options, quantize_w8a16
from mixexport.pipeline import BuildOptions, build, initial_bundle, to_onnx_stage
from mixexport.source import load_source
from mixexport.verification.int8 import check_int8_survival, int8_survival, int8_weights, survival_report
from tests import w8a16_models as wm

UNPINNED = {"graph_optimization_level": "ORT_ENABLE_ALL"}  # ORT's own defaults, nothing pinned
FOLDING = {"graph_optimization_level": "ORT_ENABLE_ALL", "config": {"session.disable_quant_qdq": "1"}}
# pinning only the accuracy level (float activations) is not enough to keep the reference form
ACCURACY_ONLY = {"graph_optimization_level": "ORT_ENABLE_ALL",
                 "config": {"session.qdq_matmulnbits_accuracy_level": "0"}}


@pytest.fixture(scope="module")
def source(tiny_ckpt: Path):
    return load_source(tiny_ckpt)


@pytest.fixture(scope="module")
def rankmixer_int8(source) -> onnx.ModelProto:
    """The tiny rankmixer after the pass: Gemm(transB=1) 2-D weights, [T,D,H] weights, embeddings."""
    bundle = to_onnx_stage(initial_bundle(source), source.example_request(2, 16))
    return quantize_w8a16(bundle, Options(embeddings="per-row")).bundle.segments[0].onnx


def _quantized(source, granularity: str = "per-token-channel", keep: set[str] | None = None) -> onnx.ModelProto:
    model = wm.float_model()
    res = quantize_w8a16(wm.bundle_of(model, source), Options(granularity=granularity, embeddings="per-row"))
    out = res.bundle.segments[0].onnx
    if keep is None:
        return out
    producers = {o: n for n in out.graph.node for o in n.output}
    needed, stack = set(), list(keep)
    while stack:  # the nodes the kept outputs depend on
        node = producers.get(stack.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            stack += list(node.input)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(out)
    nodes = [n for n in pruned.graph.node if n.name in needed]
    used = {i for n in nodes for i in n.input}
    inits = [t for t in pruned.graph.initializer if t.name in used]
    for field, items in ((pruned.graph.node, nodes), (pruned.graph.initializer, inits),
                         (pruned.graph.output, [o for o in pruned.graph.output if o.name in keep])):
        del field[:]
        field.extend(items)
    onnx.checker.check_model(pruned, full_check=True)
    return pruned


def test_pinned_options_keep_rankmixer_weights_int8(rankmixer_int8: onnx.ModelProto) -> None:
    weights = int8_weights(rankmixer_int8)
    assert len(weights) == 11 and list(weights.values()).count("embedding") == 3
    report = check_int8_survival(rankmixer_int8, DEFAULT_OPTIONS)
    assert report["status"] == "PASS" and report["surviving"] == 11 and not report["rewrites"]
    assert set(report["weights"].values()) == {"ok"}
    assert report["optimized_ops"]["DequantizeLinear"] == 11


@pytest.mark.parametrize("granularity", ["per-token-channel", "per-channel", "per-tensor"])
def test_pinned_options_keep_3d_and_gemm_transb_weights(source, granularity: str) -> None:
    model = _quantized(source, granularity, keep={"y_tok", "y_gemm_t", "y_emb"})
    report = check_int8_survival(model, DEFAULT_OPTIONS)
    assert report["weights"] == {"gemm_t.weight.int8": "ok", "tok.weight.int8": "ok", "table.weight.int8": "ok"}


def test_pinned_options_keep_2d_matmul_weights(source) -> None:
    check_int8_survival(_quantized(source, keep={"y_mm", "y_gemm_n"}), DEFAULT_OPTIONS)


def test_accuracy_level_alone_still_rewrites_2d_matmul(source) -> None:
    """Pinning only the accuracy level: ORT rewrites 2-D [K,N] weights into MatMulNBits at level 0; the
    check reports it (the graph is not the reference form) though the numbers are still W8A16's."""
    model = _quantized(source, keep={"y_mm", "y_gemm_n"})
    report = survival_report(model, ACCURACY_ONLY)
    assert report["status"] == "FAIL" and report["rewrites"] == {"MatMulNBits": 2}
    for name in ("mm.weight.int8", "gemm_n.weight.int8"):
        assert report["weights"][name].startswith("rewritten by ORT into MatMulNBits(bits=8, accuracy_level=0")
        assert "W8A8" not in report["weights"][name]
    want = wm.run_ort(model, wm.feeds(), {"graph_optimization_level": "ORT_ENABLE_BASIC"})
    got = wm.run_ort(model, wm.feeds(), ACCURACY_ONLY)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * np.abs(want[name]).max())
    assert check_int8_survival(model, DEFAULT_OPTIONS)["status"] == "PASS"  # the bundle's pin keeps the form


def test_unpinned_defaults_become_w8a8_and_are_caught(source) -> None:
    model = _quantized(source, keep={"y_mm", "y_tok"})
    with pytest.raises(GateFailedError) as e:
        check_int8_survival(model, UNPINNED)
    assert "mm.weight.int8: rewritten by ORT into MatMulNBits(bits=8, accuracy_level=4" in e.value.message
    assert "(int8 activations: W8A8)" in e.value.message and "tok.weight" not in e.value.message
    # and it matters: the W8A8 kernel is far from the W8A16 result
    want = wm.run_ort(model, wm.feeds(), {"graph_optimization_level": "ORT_ENABLE_BASIC"})["y_mm"]
    got = wm.run_ort(model, wm.feeds(), UNPINNED)["y_mm"]
    assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()


def test_folding_back_to_float_is_caught(source, rankmixer_int8: onnx.ModelProto) -> None:
    report = survival_report(_quantized(source), FOLDING)
    assert report["weights"]["tok.weight.int8"] == "folded back to float: tok.weight is now a FLOAT initializer"
    assert report["weights"]["mm.weight.int8"] == "folded back to float: mm.weight is now a FLOAT initializer"
    assert report["weights"]["table.weight.int8"] == "ok"  # gathered rows are not constant: nothing to fold
    with pytest.raises(GateFailedError, match=r"blocks\.0\.ffn\.fc1\.weight\.int8: folded back to float"):
        check_int8_survival(rankmixer_int8, FOLDING)


def test_weights_missing_from_the_file_fail(source) -> None:
    model = _quantized(source, keep={"y_tok"})
    report = survival_report(model, DEFAULT_OPTIONS, expected=["tok.weight.int8", "fc.weight.int8"])
    assert report["failures"] == ["fc.weight.int8: not an int8 DequantizeLinear/Gather weight in the model file"]
    with pytest.raises(BadInputError, match="unknown session option keys"):
        survival_report(model, {**DEFAULT_OPTIONS, "execution_mode": "parallel"})


def test_int8_survival_reads_the_bundle(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "w8"
    build(tiny_ckpt, BuildOptions(out=out, passes=("quantize-w8a16",), bench=False))
    report = int8_survival(read_manifest(out))
    assert report["status"] == "PASS" and report["segments"]["model"]["surviving"] == 11
    # the same bundle served with options that fold the weights back to float must fail the gate
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["segments"][0]["session_options"]["config"]["session.disable_quant_qdq"] = "1"
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(GateFailedError, match="segment model: tokenizer.weight.int8: folded back to float"):
        int8_survival(read_manifest(bad))
    # a bundle whose manifest lists int8 weights the file no longer holds fails too
    data["segments"][0]["session_options"]["config"].pop("session.disable_quant_qdq")
    data["passes"][0]["report"]["segments"]["model"]["int8_weights"].append("ghost.int8")
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(GateFailedError, match="ghost.int8: not an int8"):
        int8_survival(read_manifest(bad))

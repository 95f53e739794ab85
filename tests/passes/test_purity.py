"""Every pass in the pass table is pure: run under its contract (requires → run → ensures), it never
changes the bundle it was given — segments, programs (graph and weights), ONNX protos, caches,
precision. One test over :data:`mixexport.passes.order.ORDER`; a new pass needs an input here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from mixexport.bundle import Bundle
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.order import ORDER
from mixexport.pipeline import initial_bundle, run_pass, to_onnx_stage
from mixexport.source import load_source
from tests.conftest import make_checkpoint


def _program_bundle(tmp: Path, family: str) -> Bundle:
    return initial_bundle(load_source(make_checkpoint(tmp / f"{family}.pt", family)))


def _onnx_bundle(tmp: Path, family: str) -> Bundle:
    source = load_source(make_checkpoint(tmp / f"{family}.pt", family))
    return to_onnx_stage(initial_bundle(source), source.example_request(2, 16))


def _pack_changed(before: Bundle, result: PassResult) -> None:
    assert any("experts" in k for k in before.segments[0].program.state_dict)  # still the unpacked program
    assert not any(".experts." in k for k in result.bundle.segments[0].program.state_dict)


def _split_changed(before: Bundle, result: PassResult) -> None:
    assert len(before.segments) == 1 and [s.role for s in result.bundle.segments] == ["user", "item"]


def _kv_changed(before: Bundle, result: PassResult) -> None:
    assert before.caches == () and len(before.segments) == 1
    assert [s.role for s in result.bundle.segments] == ["cache", "user", "item"] and len(result.bundle.caches) == 1


def _quantize_changed(before: Bundle, result: PassResult) -> None:
    assert before.precision == "fp32" and result.bundle.precision == "w8a16"


def _int8_changed(before: Bundle, result: PassResult) -> None:
    assert before.precision == "fp32" and result.bundle.precision == "int8"


def _externalize_changed(before: Bundle, result: PassResult) -> None:
    assert before.tables == () and len(result.bundle.tables) == 3
    assert any(s.name.endswith("__embed_item_table") for s in result.bundle.segments[0].inputs)


#: pass name → (input bundle, options as keyword arguments, what the result must show)
INPUTS: dict[str, tuple[Callable[[Path], Bundle], dict[str, Any], Callable[[Bundle, PassResult], None]]] = {
    "pack-moe-experts": (lambda tmp: _program_bundle(tmp, "rankmixer-moe"), {}, _pack_changed),
    "split-user-item": (lambda tmp: _program_bundle(tmp, "ugsep"), {}, _split_changed),
    "extract-kv-cache": (lambda tmp: _program_bundle(tmp, "longer"), {}, _kv_changed),
    "quantize-w8a16": (lambda tmp: _onnx_bundle(tmp, "rankmixer"),
                       {"granularity": "per-tensor", "embeddings": "per-row"}, _quantize_changed),
    "quantize-int8": (lambda tmp: _onnx_bundle(tmp, "rankmixer"), {"activations": "per-tensor"}, _int8_changed),
    "externalize-embeddings": (lambda tmp: _program_bundle(tmp, "rankmixer"), {"min_bytes": 0}, _externalize_changed),
}


def _snapshot(bundle: Bundle) -> dict[str, Any]:
    """Everything a pass could change in place, copied."""
    segments = []
    for seg in bundle.segments:
        entry: dict[str, Any] = {"object": seg, "name": seg.name, "role": seg.role, "inputs": seg.inputs,
                                 "outputs": seg.outputs, "program": seg.program, "onnx": seg.onnx}
        if seg.program is not None:
            entry["code"] = seg.program.graph_module.code
            entry["state"] = {k: v.clone() for k, v in seg.program.state_dict.items()}
        if seg.onnx is not None:
            entry["proto"] = seg.onnx.SerializeToString()
        segments.append(entry)
    return {"segments_tuple": bundle.segments, "segments": segments, "stage": bundle.stage,
            "caches": bundle.caches, "passes": bundle.passes, "precision": bundle.precision}


def _assert_unchanged(bundle: Bundle, snap: dict[str, Any]) -> None:
    assert bundle.segments is snap["segments_tuple"]
    assert (bundle.stage, bundle.caches, bundle.passes, bundle.precision) == (
        snap["stage"], snap["caches"], snap["passes"], snap["precision"])
    for seg, entry in zip(bundle.segments, snap["segments"], strict=True):
        assert seg is entry["object"] and seg.program is entry["program"] and seg.onnx is entry["onnx"]
        assert (seg.name, seg.role, seg.inputs, seg.outputs) == (entry["name"], entry["role"], entry["inputs"],
                                                                 entry["outputs"])
        if "code" in entry:
            assert seg.program.graph_module.code == entry["code"]
            assert set(seg.program.state_dict) == set(entry["state"])
            assert all(torch.equal(seg.program.state_dict[k], v) for k, v in entry["state"].items())
        if "proto" in entry:
            assert seg.onnx.SerializeToString() == entry["proto"]


def test_every_pass_in_the_table_has_an_input_here() -> None:
    assert sorted(INPUTS) == sorted(p.name for p in ORDER)


@pytest.mark.parametrize("info", ORDER, ids=lambda p: p.name)
def test_pass_is_pure(info: PassInfo, tmp_path: Path) -> None:
    if info.name not in INPUTS:
        pytest.fail(f"pass {info.name} has no input in tests/passes/test_purity.py INPUTS")
    make_input, kwargs, changed = INPUTS[info.name]
    bundle = make_input(tmp_path)
    snap = _snapshot(bundle)
    result = run_pass(info, bundle, info.options(**kwargs), [])
    _assert_unchanged(bundle, snap)
    assert result.bundle is not bundle and result.bundle.segments is not bundle.segments
    changed(bundle, result)
    # a second run on the same input sees the same input (nothing the first run did shows on it)
    run_pass(info, bundle, info.options(**kwargs), [])
    _assert_unchanged(bundle, snap)

"""quantize-w8a16 end to end: a MovieLens-trained tiny rankmixer built with the pass passes verify
(tensor parity at the w8a16 tolerance, |ΔAUC| within the w8a16 gate on the real test split), its
int8 weights survive ONNX Runtime, and its weights take ≤ 0.27× the bytes of the fp32 bundle's."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixexport.bundle import read_manifest
from mixexport.export import load_onnx, weight_bytes
from mixexport.pipeline import BuildOptions, BuildResult, build
from mixexport.verification.int8 import int8_survival
from mixexport.verification.run import AUC_GATE


@pytest.fixture(scope="module")
def built(ml_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuildResult]:
    root = tmp_path_factory.mktemp("w8a16-build")
    return {name: build(ml_ckpt, BuildOptions(out=root / name, passes=passes, bench=False))
            for name, passes in (("fp32", ()), ("w8a16", ("quantize-w8a16",)))}


def _weight_bytes_on_disk(out: Path) -> int:
    """Initializer bytes of every segment file as saved (external data included)."""
    manifest = read_manifest(out)
    return sum(weight_bytes(load_onnx(manifest.file(s.file))) for s in manifest.segments)


def test_verify_passes_with_the_w8a16_gates(built: dict[str, BuildResult]) -> None:
    res = built["w8a16"]
    assert res.parity["status"] == "PASS", res.parity["failures"]
    assert res.parity["precision"] == res.manifest["precision"] == "w8a16"
    auc = res.parity["metrics"]["auc"]
    assert res.parity["metrics"]["dataset"] == "movielens-100k test split"
    assert abs(auc["delta"]) <= AUC_GATE["w8a16"] == 1e-3, auc
    assert 0 < res.parity["max_rel"] < 0.05  # quantized (not bit-equal) yet close
    (record,) = res.manifest["passes"]
    assert record["name"] == "quantize-w8a16" and record["options"]["granularity"] == "per-token-channel"


def test_weight_bytes_at_most_027_of_fp32(built: dict[str, BuildResult]) -> None:
    fp32, w8 = (_weight_bytes_on_disk(built[k].out) for k in ("fp32", "w8a16"))
    assert w8 <= 0.27 * fp32, f"{w8} / {fp32} = {w8 / fp32:.4f}"
    seg = built["w8a16"].manifest["segments"][0]
    assert seg["weight_bytes"] == w8 and seg["ops"]["DequantizeLinear"] == 11
    assert built["w8a16"].manifest["passes"][0]["report"]["weight_bytes"]["ratio"] == pytest.approx(w8 / fp32)


def test_int8_weights_survive_in_the_built_bundle(built: dict[str, BuildResult]) -> None:
    report = int8_survival(read_manifest(built["w8a16"].out))
    assert report["status"] == "PASS" and report["segments"]["model"]["surviving"] == 11
    assert int8_survival(read_manifest(built["fp32"].out))["status"] == "skipped"

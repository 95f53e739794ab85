"""``--target openvino`` and the OpenVINO bench peers, on tiny random-init models.

OpenVINO is an optional extra (``.[openvino]``): without it these tests skip with the reason, except
where CI sets ``MIXEXPORT_REQUIRE_OPENVINO=1``, where a missing OpenVINO fails them.

Bundles are built once per family and precision in this process (:func:`_bundle`) and shared.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixexport.backends.openvino import (BF16_FLAGS, OpenVinoBackend, bf16_unavailable_reason, int8_unavailable_reason,
                                         missing_features)
from mixexport.errors import EnvironmentUnavailableError, IntegrityError
from mixexport.machine import has_flags
from mixexport.models import FAMILIES
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.verification.compare import compare_outputs, resolve_tolerances
from tests.cli_helpers import run_cli
from tests.conftest import make_checkpoint

#: A Zen 3 server's kernel flags (AVX2, no AVX-512, no VNNI, no BF16).
ZEN3 = frozenset({"avx", "avx2", "fma", "f16c", "sse4_2"})


def require_openvino() -> None:
    reason = OpenVinoBackend().unavailable_reason()
    if reason is None:
        return
    if os.environ.get("MIXEXPORT_REQUIRE_OPENVINO") == "1":
        pytest.fail(f"MIXEXPORT_REQUIRE_OPENVINO=1 but {reason}")
    pytest.skip(reason)


_BUILT: dict[tuple[str, str], Path] = {}


def _bundle(root: Path, family: str, precision: str = "fp32") -> Path:
    """The tiny ``family`` built for OpenVINO at ``precision`` (verify runs inside the build: it
    raises unless parity passed), once per process."""
    from mixexport.pipeline import BuildOptions, build

    key = (family, precision)
    if key not in _BUILT:
        ckpt = root / f"{family}.pt"
        if not ckpt.exists():
            make_checkpoint(ckpt, family)
        out = root / f"{family}.openvino.{precision}"
        build(ckpt, BuildOptions(out=out, target="openvino", precision=precision, bench=False, metrics=False))
        _BUILT[key] = out
    return _BUILT[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_openvino()
    return tmp_path_factory.mktemp("openvino")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_on_openvino_matches_eager_at_fp32_gates(root: Path, family: str) -> None:
    out = _bundle(root, family)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "openvino" and manifest["precision"] == "fp32"
    for seg in manifest["segments"]:
        xml = seg["engines"]["openvino"]
        assert xml in manifest["files"] and xml.removesuffix(".xml") + ".bin" in manifest["files"]
        assert seg["session_options"]["inference_precision"] == "f32"  # explicit, never OpenVINO's default
    source = load_source(root / f"{family}.pt")
    request = source.example_request(3, 9, seed=4)
    with Runtime.open(out) as rt, Runtime.reference(source) as ref:
        assert rt.name == "openvino"
        res = compare_outputs(rt.score(request), ref.score(request),
                              *resolve_tolerances([o.name for o in source.outputs], "fp32", {}, {}))
    assert all(x.passed for x in res), [x.line() for x in res]


def test_a_changed_ir_weights_file_is_refused_before_loading(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(_bundle(root, "rankmixer"), copy)
    weights = copy / "engines" / "model.openvino.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.openvino.bin"):
        Runtime.open(copy)


def test_a_session_option_openvino_would_not_take_is_one_line_exit_2(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(_bundle(root, "rankmixer"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["segments"][0]["session_options"]["inference_precision"] = "f16"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("verify", str(copy), "--no-metrics")
    assert r.code == 2 and "inference_precision is 'f16'" in r.err and "Traceback" not in r.err


def test_bf16_needs_avx512_bf16_or_amx_and_a_zen3_is_refused() -> None:
    reason = bf16_unavailable_reason(lambda flag: flag in ZEN3)
    assert reason is not None and "avx512_bf16" in reason and "amx_bf16" in reason
    assert bf16_unavailable_reason(lambda flag: flag in ZEN3 | {"avx512_bf16"}) is None
    assert bf16_unavailable_reason(lambda flag: flag in ZEN3 | {"amx_bf16"}) is None
    assert "VNNI" in (int8_unavailable_reason(lambda flag: flag in ZEN3) or "").upper()
    assert missing_features(["a|b", "c"], lambda flag: flag == "b") == ["c"]


@pytest.mark.skipif(any(has_flags(f) for f in BF16_FLAGS), reason="this CPU has bf16 GEMMs: nothing to refuse")
def test_build_bf16_on_a_cpu_without_bf16_exits_3(tmp_path: Path) -> None:
    require_openvino()
    ckpt = make_checkpoint(tmp_path / "rm.pt")
    r = run_cli("build", str(ckpt), "--target", "openvino", "--precision", "bf16", "--out", str(tmp_path / "b"))
    assert r.code == 3, r.err
    assert "needs AVX-512 BF16 or AMX" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(not any(has_flags(f) for f in BF16_FLAGS), reason="this CPU has no bf16 GEMMs")
def test_bf16_bundle_passes_bf16_gates_and_a_serving_cpu_without_its_features_is_refused(
        root: Path, tmp_path: Path) -> None:
    out = _bundle(root, "rankmixer", "bf16")
    manifest = json.loads((out / "manifest.json").read_text())
    seg = manifest["segments"][0]
    assert manifest["precision"] == "bf16" and seg["session_options"]["inference_precision"] == "bf16"
    assert seg["session_options"]["requires_cpu"] == ["avx512_bf16|amx_bf16"]
    absent = next((f for f in ("amx_bf16", "amx_int8", "avx512_fp16") if not has_flags(f)), None)
    if absent is None:
        pytest.skip("this CPU has every feature a manifest could require here")
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    seg["session_options"]["requires_cpu"] = [absent]  # as if built on a CPU with ``absent`` bf16 kernels
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EnvironmentUnavailableError, match=absent):
        Runtime.open(copy)
    r = run_cli("verify", str(copy), "--no-metrics")
    assert r.code == 3 and absent in r.err and "Traceback" not in r.err


@pytest.mark.skipif(int8_unavailable_reason() is not None, reason="this CPU has no VNNI")
def test_int8_is_nncf_quantized_ir_recorded_and_gated(root: Path) -> None:
    out = _bundle(root, "rankmixer", "int8")
    manifest = json.loads((out / "manifest.json").read_text())
    seg = manifest["segments"][0]
    assert manifest["precision"] == "int8" and manifest["passes"] == []  # no com.microsoft pass for OpenVINO
    assert seg["engine_build"]["int8"]["status"] == "PASS" and seg["engine_build"]["int8"]["ratio"] < 0.5
    assert seg["engine_build"]["built_on_cpu"]["flags"]  # the build CPU's features are recorded
    assert seg["session_options"]["requires_cpu"] == ["avx512_vnni|avx_vnni|amx_int8"]
    # the input projections (before the first LayerNorm) stay float, every later GEMM has int8 weights
    quant = seg["engine_build"]["int8"]["quantization"]
    assert quant["float_gemms"] and quant["int8_constants"] == quant["gemms"] - len(quant["float_gemms"]) > 0


def test_nncf_writes_nothing_on_stdout_during_a_quantization(capfd: pytest.CaptureFixture[str]) -> None:
    """NNCF logs INFO on stdout, where ``build --json`` / ``bench --json`` write their JSON."""
    nncf = pytest.importorskip("nncf")
    from mixexport.backends.openvino_int8 import quiet_nncf

    before = nncf.nncf_logger.level
    with quiet_nncf(nncf):
        nncf.nncf_logger.info("nncf-info-line")
        print("a-print")
    out, err = capfd.readouterr()
    assert "nncf-info-line" not in out + err and "a-print" not in out and "a-print" in err
    assert nncf.nncf_logger.level == before


def test_int8_float_gemms_are_those_before_the_first_normalization() -> None:
    require_openvino()
    import openvino as ov
    import openvino.opset13 as ops

    from mixexport.backends.openvino_int8 import float_gemms

    def weight(k: int, n: int) -> ov.Node:
        return ops.constant(np.ones((k, n), np.float32))

    x = ops.parameter([-1, 4], np.float32, name="x")
    proj = ops.matmul(x, weight(4, 32), False, False)
    proj.set_friendly_name("projection")
    norm = ops.mvn(proj, ops.constant(np.array([-1], np.int64)), True, 1e-5, "inside_sqrt")
    ffn = ops.matmul(ops.relu(norm), weight(32, 32), False, False)
    ffn.set_friendly_name("ffn")
    skip = ops.matmul(x, weight(4, 32), False, False)  # a second input projection, added after the norm
    skip.set_friendly_name("skip")
    model = ov.Model([ops.add(ffn, skip)], [x])
    assert sorted(float_gemms(model)) == ["projection", "skip"]


def test_int8_keeps_routers_and_tiny_gemms_float() -> None:
    """A router (by its weight's name, as quantize-int8's skip patterns) and a GEMM with a dimension
    of at most 16 (a few experts, one logit) stay float; a 32 x 32 one after them does not."""
    require_openvino()
    import openvino as ov
    import openvino.opset13 as ops

    from mixexport.backends.openvino_int8 import small_gemms

    def gemm(x: ov.Output, k: int, n: int, weight_name: str, name: str) -> ov.Node:
        w = ops.constant(np.ones((k, n), np.float32))
        w.set_friendly_name(weight_name)
        out = ops.matmul(x, w, False, False)
        out.set_friendly_name(name)
        return out

    x = ops.parameter([-1, 32], np.float32, name="x")
    router = gemm(x, 32, 32, "blocks.0.ffn.router.weight", "router")
    gates = gemm(router, 32, 4, "blocks.0.ffn.gates", "gates")
    ffn = gemm(x, 32, 32, "blocks.0.ffn.w_in", "ffn")
    logit = gemm(ffn, 32, 1, "head.out.weight", "logit")
    model = ov.Model([gates, logit], [x])
    assert sorted(small_gemms(model, ("*router*",))) == ["gates", "logit", "router"]
    assert sorted(small_gemms(model, ())) == ["gates", "logit"]


def test_openvino_peers_run_the_plain_model(root: Path) -> None:
    from mixexport.verification.peers import make_peers, unavailable_peers

    assert unavailable_peers(["openvino", "nncf-int8", "ort-default"]) == {}
    source = load_source(_bundle(root, "rankmixer").parent / "rankmixer.pt")
    said: list[str] = []
    peers = make_peers(["openvino", "openvino-default", "nncf-int8"], source, said.append)
    assert any(k == "openvino (f32)" for k in peers) and any(k.startswith("openvino-default (") for k in peers)
    request = source.example_request(1, 12, seed=3)
    with Runtime.reference(source) as ref:
        want = ref.score(request)[source.outputs[0].name]
    for name, run in peers.items():
        got = run(request)[0]
        assert got.shape == want.shape, name
        rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        assert rel < (1e-5 if name == "openvino (f32)" else 0.5), (name, rel)


def test_a_peer_whose_package_is_missing_is_named_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from mixexport.verification import peers

    monkeypatch.setitem(peers.PEER_PACKAGES, "nncf-int8", ("openvino", "mixexport_absent_package"))
    reasons = peers.unavailable_peers(["ort-default", "nncf-int8"])
    assert list(reasons) == ["nncf-int8"]
    assert "mixexport_absent_package" in reasons["nncf-int8"] and "mixexport[openvino]" in reasons["nncf-int8"]

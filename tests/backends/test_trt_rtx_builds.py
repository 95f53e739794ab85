"""TensorRT-RTX builds engines on this GPU-less machine: every segment of every family × every pass
combination of the fuzzer must parse and build, at fp32 and fp16 (CI installs TensorRT-RTX and fails
rather than skips these). fp32: the fuzzer's CI slice (tests/test_fuzz.py) builds one random config
of every combination with ``--target trt-rtx``; fp16: the tiny configs of every combination, here.
Plus the whole CLI path (`mixexport build --target trt-rtx`, then `verify`, which cannot execute the
engines here and says so), the per-axis profile of LONGER with a
merge that is not a power of two, and the int8-in-the-engine check on a model whose weights dominate
its engine.

The combination test skips verify/bench (the pipeline's other tests cover them): it exports the
segments exactly as ``build`` does and hands them to the backend's ``compile``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from mixexport.backends.tensorrt import RTX_DEFAULT_ARCHS, TensorRTRtxBackend
from mixexport.bundle import BundleWriter, PassRecord
from mixexport.export import save_onnx
from mixexport.testing.fuzz import INT8, combinations
from mixexport.models import FAMILIES
from mixexport.pipeline import SAMPLE_CANDIDATES, SAMPLE_USERS, initial_bundle, parse_pass_options, run_pass
from mixexport.pipeline import select_passes, to_onnx_stage
from mixexport.precision import cast_bundle
from mixexport.source import load_source
from tests.conftest import make_checkpoint
from tests.trt_rtx import require_trt_rtx
from tests.cli_helpers import MIXEXPORT

#: int8 compute (``--precision int8``) is ONNX Runtime CPU's alone: TensorRT targets refuse it
COMBOS = [(f, p) for f, p in combinations() if INT8 not in p]


#: Fewer layers than the tiny configs where that keeps every block kind (LONGER: one cross-attention
#: and one self-attention layer; TokenMixer-Large: an inter-layer residual; MixFormer and HyFormer:
#: every layer has the same blocks): export time is per layer.
LAYERS = {"longer": 2, "tokenmixer-large": 3, "mixformer": 1, "hyformer": 1}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rtx-ckpt")
    configs = {f: FAMILIES[f].tiny() for f in FAMILIES}
    configs = {f: dataclasses.replace(c, layers=LAYERS.get(f, c.layers)) for f, c in configs.items()}
    return {f: make_checkpoint(root / f"{f}.pt", f, configs[f]) for f in FAMILIES}


def staged_bundle(ckpt: Path, passes: tuple[str, ...], precision: str, backend: TensorRTRtxBackend):
    """What ``build`` hands the backend: passes run (with the backend's pass defaults), ONNX exported."""
    source = load_source(ckpt)
    chosen = select_passes(source, passes)
    options = parse_pass_options((), chosen, backend.PASS_DEFAULTS)
    request = source.example_request(SAMPLE_USERS, SAMPLE_CANDIDATES, seed=0)
    bundle, done = cast_bundle(initial_bundle(source), precision), []
    for info in chosen:
        if info.stage == "onnx" and bundle.stage == "program":
            bundle = to_onnx_stage(bundle, request)
        result = run_pass(info, bundle, options[info.name], done)
        record = PassRecord(info.name, dataclasses.asdict(options[info.name]), result.report)
        bundle = result.bundle.replace(passes=bundle.passes + (record,))
        done.append(info.name)
    return to_onnx_stage(bundle, request) if bundle.stage == "program" else bundle


@pytest.mark.parametrize("precision", ["fp16"])
@pytest.mark.parametrize("family,passes", COMBOS, ids=[f"{f}[{','.join(p) or 'none'}]" for f, p in COMBOS])
def test_every_segment_builds(family: str, passes: tuple[str, ...], precision: str,
                              checkpoints: dict[str, Path], tmp_path: Path) -> None:
    require_trt_rtx()
    backend = TensorRTRtxBackend()
    bundle = staged_bundle(checkpoints[family], passes, precision, backend)
    with BundleWriter(tmp_path / "b", force=False) as writer:
        for seg in bundle.segments:
            save_onnx(seg.onnx, writer.path(f"segments/{seg.name}.onnx"))
        entries = backend.compile(bundle, writer, lambda _m: None)
        for seg in bundle.segments:
            plan = writer.tmp / entries[seg.name]["tensorrt-rtx"]
            report = backend.engine_reports[seg.name]
            assert plan.stat().st_size == report["bytes"] > 0
            assert report["archs"] == list(RTX_DEFAULT_ARCHS) and report["version"]
            # the parsed network's I/O is the manifest's, every dynamic axis has a box
            assert [i["name"] for i in report["io"]["inputs"]] == [s.name for s in seg.inputs]
            assert set(report["profile"]) == {s.name for s in seg.inputs}


def test_cli_build_verify_without_gpu(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The README's command on a machine without a GPU: one .plan per segment, listed with its sha256
    and its build record; verify checks the ONNX path and says the engines were not executed."""
    require_trt_rtx()
    out = tmp_path / "T"
    run = subprocess.run([MIXEXPORT, "build", str(checkpoints["ugsep"]), "--target", "trt-rtx", "--out", str(out),
                          "--no-bench", "--arch", "sm86,sm120"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "not executed here: no compatible GPU" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "trt-rtx" and len(manifest["segments"]) == 2  # ugsep: user + item
    for seg in manifest["segments"]:
        rel = seg["engines"]["tensorrt-rtx"]
        assert rel == f"engines/{seg['name']}.tensorrt-rtx.sm86-sm120.plan" and rel in manifest["files"]
        assert seg["engine_build"]["archs"] == ["sm86", "sm120"] == seg["session_options"]["archs"]
        assert seg["engine_build"]["bytes"] == (out / rel).stat().st_size
    ver = subprocess.run([MIXEXPORT, "verify", str(out), "--json"], capture_output=True, text=True)
    assert ver.returncode == 0, ver.stderr
    report = json.loads(ver.stdout)
    assert report["backend"] == "onnxruntime" and report["engines"]["executed"] is False
    assert "engines built for sm86,sm120, not executed here: no compatible GPU" in report["engines"]["reason"]
    forced = subprocess.run([MIXEXPORT, "verify", str(out), "--backend", "tensorrt-rtx"], capture_output=True, text=True)
    assert forced.returncode == 3 and "error: TensorRT-RTX needs a CUDA GPU" in forced.stderr
    assert "Traceback" not in forced.stderr


def test_longer_kv_merge_three(tmp_path: Path) -> None:
    """merge 3 (not a power of two): the sequence box is 3 × the groups box, groups >= recent."""
    require_trt_rtx()
    from mixexport.models import longer

    cfg = longer.tiny()
    cfg = dataclasses.replace(cfg, merge=3, layers=2, recent=2, schema=dataclasses.replace(cfg.schema, seq_len=24))
    ckpt = make_checkpoint(tmp_path / "l3.pt", "longer", cfg)
    backend = TensorRTRtxBackend()
    bundle = staged_bundle(ckpt, ("extract-kv-cache",), "fp32", backend)
    with BundleWriter(tmp_path / "b", force=False) as writer:
        for seg in bundle.segments:
            save_onnx(seg.onnx, writer.path(f"segments/{seg.name}.onnx"))
        backend.compile(bundle, writer, lambda _m: None)
    profile = backend.engine_reports["user"]["profile"]
    (lo, opt, hi) = (box[1] for box in profile["seq_items"])
    groups = [box[2] for box in profile["cache_0"]]
    assert [lo, opt, hi] == [3 * g for g in groups] and groups[0] >= cfg.recent


def test_int8_weights_stay_int8_in_the_engine(tmp_path: Path) -> None:
    """W8A16 on a rankmixer whose weights dominate its engine (T=8, D=256: 8.4 M parameters): the
    int8 engine is at most 0.35x its float twin's bytes, and the build's check says PASS."""
    require_trt_rtx()
    from mixexport.models import rankmixer

    ckpt = make_checkpoint(tmp_path / "rm256.pt", "rankmixer", rankmixer.Config(tokens=8, dim=256, layers=2))
    backend = TensorRTRtxBackend()
    bundle = staged_bundle(ckpt, ("quantize-w8a16",), "fp32", backend)
    with BundleWriter(tmp_path / "b", force=False) as writer:
        save_onnx(bundle.segments[0].onnx, writer.path("segments/model.onnx"))
        backend.compile(bundle, writer, lambda _m: None)
    check = backend.engine_reports["model"]["int8"]
    assert check["status"] == "PASS" and check["ratio"] <= 0.35, check

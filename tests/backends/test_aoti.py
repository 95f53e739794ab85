"""``--target aoti``: real AOTInductor compiles on CPU, the session through the runtime, verify and
bench through the real CLI, and the refusals (CUDA without a GPU, ONNX-stage passes)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mixexport.backends.aoti import AotiBackend, aoti_arch, engine_path, refuse_onnx_stage_passes
from mixexport.bundle import check_integrity, read_manifest
from mixexport.errors import BadInputError
from mixexport.runtime import Runtime
from mixexport.source import load_source
from tests.cli_helpers import MIXEXPORT



def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MIXEXPORT, *args], capture_output=True, text=True)


def test_arch_and_file_naming() -> None:
    arch = aoti_arch("cpu")
    assert arch.startswith("cpu-") and arch != "cpu-"
    assert engine_path("user", "cpu") == f"engines/user.aoti.{arch}.pt2"


def test_bundle_manifest_and_files(aoti_bundle: Path) -> None:
    m = read_manifest(aoti_bundle)
    assert m.target == "aoti" and m.data["precision"] == "fp32"
    (seg,) = m.segments
    rel = f"engines/model.aoti.{aoti_arch('cpu')}.pt2"
    assert seg.backend == "aoti" and seg.engines == {"aoti": rel}
    assert seg.session_options == {"device": "cpu"}
    assert (aoti_bundle / rel).stat().st_size > 0 and rel in m.data["files"]
    check_integrity(m)  # the package is hashed like every other file
    assert m.data["parity"]["status"] == "PASS" and m.data["parity"]["max_rel"] <= 1e-5


def test_package_metadata_names_inputs(aoti_bundle: Path) -> None:
    import torch

    m = read_manifest(aoti_bundle)
    pkg = torch._inductor.aoti_load_package(str(aoti_bundle / m.segments[0].engines["aoti"]))
    meta = pkg.get_metadata()
    assert sorted(meta["mixexport.inputs"].split(",")) == sorted(s.name for s in m.segments[0].inputs)
    assert meta["mixexport.outputs"] == "logit"


@pytest.mark.parametrize("users,candidates", [(1, 1), (3, 7), (2, 300)])
def test_dynamic_axes_match_eager(aoti_bundle: Path, tiny_ckpt: Path, users: int, candidates: int) -> None:
    source = load_source(tiny_ckpt)
    req = source.example_request(users, candidates, seed=11)
    with Runtime.open(aoti_bundle) as rt, Runtime.reference(source) as ref:
        got, want = rt.score(req)["logit"], ref.score(req)["logit"]
    assert got.shape == want.shape == (candidates, 1)
    assert np.abs(got - want).max() <= 1e-5


def test_verify_and_bench_through_cli(aoti_bundle: Path) -> None:
    r = cli("verify", str(aoti_bundle), "--no-metrics", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["status"] == "PASS" and report["backend"] == "aoti"
    r = cli("bench", str(aoti_bundle), "--candidates", "1,16", "--budget", "0.05", "--json")
    assert r.returncode == 0, r.stderr
    runners = json.loads(r.stdout)["runners"]
    assert set(runners) == {"eager", "bundle (aoti)"} and set(runners["bundle (aoti)"]) == {"1", "16"}
    # the bundle keeps its ONNX segments, so the same bundle benches with ONNX Runtime too
    from mixexport.verification.run import bench_bundle

    report = bench_bundle(aoti_bundle, backend="onnxruntime", candidates=(4,), budget_s=0.02)
    assert set(report["runners"]) == {"eager", "bundle (onnxruntime)"}


def test_cpu_package_refused_on_cuda(aoti_bundle: Path) -> None:
    m = read_manifest(aoti_bundle)
    with pytest.raises(BadInputError, match="compiled for cpu, not cuda"):
        AotiBackend(device="cuda").prepare(m, m.segments[0])


def test_cuda_without_gpu_exits_3_and_writes_nothing(tiny_ckpt: Path, tmp_path: Path) -> None:
    if AotiBackend(device="cuda").unavailable_reason() is None:
        pytest.skip("a CUDA GPU is present: the exit-3 path does not apply")
    out = tmp_path / "b"
    r = cli("build", str(tiny_ckpt), "--target", "aoti", "--device", "cuda", "--out", str(out))
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("error: --device cuda: no usable CUDA GPU for AOTInductor")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_onnx_stage_passes_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    from mixexport.pipeline import ORDER

    onnx_passes = [p.name for p in ORDER if p.stage == "onnx"]
    if not onnx_passes:
        pytest.skip("no ONNX-stage pass is registered in mixexport.pipeline.ORDER")
    refuse_onnx_stage_passes([p.name for p in ORDER if p.stage == "program"], "aoti")  # these are fine
    with pytest.raises(BadInputError, match="ONNX-stage passes"):
        refuse_onnx_stage_passes(onnx_passes, "aoti")
    out = tmp_path / "b"
    r = cli("build", str(tiny_ckpt), "--target", "aoti", "--passes", onnx_passes[0], "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert "--target aoti compiles the torch.export program" in r.stderr and onnx_passes[0] in r.stderr
    assert not out.exists()

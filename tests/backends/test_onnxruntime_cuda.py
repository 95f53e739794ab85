"""``--target onnx --device cuda``: ONNX Runtime's CUDA provider when onnxruntime-gpu is installed;
otherwise the real CLI exits 3 naming the extra, and writes nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mixexport.backends.onnxruntime import OnnxRuntimeBackend
from tests.cli_helpers import MIXEXPORT



def test_onnx_cuda_without_provider_exits_3(tiny_ckpt: Path, tmp_path: Path) -> None:
    if OnnxRuntimeBackend(device="cuda").unavailable_reason() is None:
        pytest.skip("onnxruntime-gpu with a CUDA provider is installed: the exit-3 path does not apply")
    out = tmp_path / "bundle"
    r = subprocess.run([MIXEXPORT, "build", str(tiny_ckpt), "--target", "onnx", "--device", "cuda",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: onnxruntime has no CUDA execution provider")
    assert lines[0].endswith('pip install "mixexport[gpu]"')
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_verify_on_cuda_without_provider_exits_3(tiny_bundle: Path) -> None:
    if OnnxRuntimeBackend(device="cuda").unavailable_reason() is None:
        pytest.skip("onnxruntime-gpu with a CUDA provider is installed")
    r = subprocess.run([MIXEXPORT, "verify", str(tiny_bundle), "--device", "cuda", "--no-metrics"],
                       capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert 'pip install "mixexport[gpu]"' in r.stderr

"""Which ONNX Runtime runs: the onnxruntime and onnxruntime-gpu wheels install one module, so the
extras pick exactly one; inspect and bench say which build and providers are active, and the CUDA
refusal names the installed wheel and how to get exactly the GPU one."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mixexport.backends import onnxruntime as ortb
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]


def _fake_wheels(monkeypatch: pytest.MonkeyPatch, installed: dict[str, str]) -> None:
    def version(name: str) -> str:
        if name in installed:
            return installed[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)


def test_build_names_the_wheel_and_the_providers() -> None:
    build = ortb.ort_build()
    import onnxruntime

    assert build["version"] == onnxruntime.__version__ and "CPUExecutionProvider" in build["providers"]
    assert set(build["distributions"]) & set(ortb.ORT_DISTRIBUTIONS) and not build["conflict"]
    line = ortb.describe_ort_build(build)
    assert line.startswith(f"ONNX Runtime {onnxruntime.__version__} (wheel ") and "CPU" in line


def test_both_wheels_are_a_conflict(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_wheels(monkeypatch, {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"})
    build = ortb.ort_build()
    assert build["conflict"] and set(build["distributions"]) == {"onnxruntime", "onnxruntime-gpu"}
    assert "both onnxruntime and onnxruntime-gpu are installed and share one module" in ortb.describe_ort_build(build)
    if "CUDAExecutionProvider" not in build["providers"]:
        reason = ortb.OnnxRuntimeBackend("cuda").unavailable_reason()
        assert reason.endswith('pip uninstall -y onnxruntime onnxruntime-gpu && pip install "mixexport[gpu]"')


def test_not_installed_names_both_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_wheels(monkeypatch, {})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert ortb.ort_build() == {"distributions": {}, "version": None, "providers": [], "conflict": False}
    reason = ortb.OnnxRuntimeBackend().unavailable_reason()
    assert reason.startswith("onnxruntime is not installed: ") and '"mixexport[cpu]"' in reason
    assert '"mixexport[gpu]"' in reason and "not both" in reason


def test_cuda_refusal_says_which_build_is_active() -> None:
    reason = ortb.OnnxRuntimeBackend("cuda").unavailable_reason()
    if reason is None:
        pytest.skip("the CUDA provider is available here")
    assert f"active: {ortb.describe_ort_build()}" in reason and reason.endswith('pip install "mixexport[gpu]"')


def test_inspect_and_bench_report_the_build(tiny_bundle: Path) -> None:
    r = run_cli("inspect", str(tiny_bundle))
    assert r.code == 0 and f"runs here with {ortb.describe_ort_build()}" in r.out
    r = run_cli("inspect", str(tiny_bundle), "--json")
    assert r.code == 0 and json.loads(r.out)["onnxruntime"] == ortb.ort_build()
    r = run_cli("bench", str(tiny_bundle), "--json", "--candidates", "1", "--budget", "0")
    assert r.code == 0, r.err
    assert json.loads(r.out)["onnxruntime"] == ortb.ort_build() and ortb.describe_ort_build() in r.err
    if ortb.OnnxRuntimeBackend("cuda").unavailable_reason() is not None:
        r = run_cli("bench", str(tiny_bundle), "--device", "cuda", "--candidates", "1", "--budget", "0")
        assert r.code == 3 and "onnxruntime has no CUDA execution provider" in r.err and "active: ONNX Runtime" in r.err


def test_extras_give_exactly_one_onnxruntime() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def ort(reqs: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].strip() for r in reqs if r.startswith("onnxruntime")}

    extras = project["optional-dependencies"]
    assert ort(project["dependencies"]) == set() and ort(extras["dev"]) == set()
    assert ort(extras["cpu"]) == {"onnxruntime"} and ort(extras["gpu"]) == {"onnxruntime-gpu"}
    assert any(r.startswith("ml_dtypes") for r in project["dependencies"])  # quantize-w8a16 imports it

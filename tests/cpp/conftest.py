"""The C++ scorers, built once per test session with the one command a user runs
(``examples/cpp/build.sh BUILD_DIR``): the ONNX Runtime scorer always, the AOTI scorer where torch's
CMake files are found (they are: the torch wheel is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = ROOT / "examples" / "cpp" / "build.sh"


@dataclass(frozen=True)
class CppBuild:
    dir: Path
    log: str  # build.sh's stdout + stderr (cmake's messages)


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory: pytest.TempPathFactory) -> CppBuild:
    """examples/cpp built from scratch: headers fetched from Debian, CMake configured, both scorers compiled."""
    if not (shutil.which("cmake") and shutil.which("g++")):
        pytest.skip("cmake and g++ are needed to build examples/cpp")
    build = tmp_path_factory.mktemp("cpp-build")
    env = {**os.environ, "PYTHON": sys.executable, "JOBS": "2"}
    r = subprocess.run([str(BUILD_SH), str(build)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return CppBuild(build, r.stdout + r.stderr)

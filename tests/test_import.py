"""The package imports and the CLI starts without TensorRT (or torch) being loaded; models/ and
passes/ install inside the mixexport namespace, never as global packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, **kw)


def test_import_and_help_do_not_load_tensorrt_or_torch() -> None:
    r = run_py("import sys, mixexport, mixexport.cli\n"
               "from click.testing import CliRunner\n"
               "res = CliRunner().invoke(mixexport.cli.cli, ['--help'])\n"
               "assert res.exit_code == 0, res.output\n"
               "assert 'build' in res.output and 'verify' in res.output\n"
               "print(sorted(m for m in ('tensorrt', 'tensorrt_rtx_bindings', 'torch') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_console_script_help() -> None:
    r = subprocess.run([str(Path(sys.executable).parent / "mixexport"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for cmd in ("build", "verify", "bench", "inspect", "passes"):
        assert cmd in r.stdout


def test_installed_wheel_maps_models_and_passes_into_namespace(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(wheels), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wheel = next(wheels.glob("mixexport-*.whl"))
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (target / "models").exists() and not (target / "passes").exists()
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import mixexport.models, mixexport.models.rankmixer, mixexport.passes\n"
            "assert mixexport.models.__file__.startswith(sys.argv[1]), mixexport.models.__file__\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('models') is None and importlib.util.find_spec('passes') is None\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"

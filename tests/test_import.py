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


PACKAGE_DIRS = {"mixexport": ROOT / "mixexport", "mixexport.models": ROOT / "models",
                "mixexport.passes": ROOT / "passes"}


def _import_graph() -> dict[str, set[str]]:
    """Module → the mixexport modules it imports, anywhere in the file (a lazy import inside a
    function counts: it runs the same module the first time the function is called). Like grimp /
    import-linter, ``import a.b.c`` is an edge to ``a.b.c`` only, not to the parent packages."""
    import ast

    files = {}
    for package, folder in PACKAGE_DIRS.items():
        for f in sorted(folder.rglob("*.py")):
            parts = f.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            files.setdefault(".".join((package, *parts)), f)
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def _find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        path.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_import_graph_has_no_circle() -> None:
    graph = _import_graph()
    assert {"mixexport.pipeline", "mixexport.passes.order", "mixexport.backends.aoti"} <= set(graph)
    assert "mixexport.pipeline" not in graph["mixexport.backends.aoti"]
    circle = _find_circle(graph)
    assert circle is None, " -> ".join(circle)
    # the detector finds one when there is one
    assert _find_circle({**graph, "mixexport.backends.aoti": graph["mixexport.backends.aoti"] | {"mixexport.pipeline"}})


def test_no_pass_imports_another_pass() -> None:
    from mixexport.passes.order import ORDER

    graph = _import_graph()
    passes = {p.run.__module__ for p in ORDER}  # one pass per module; shared helpers live in mixexport.partition
    assert len(passes) == len(ORDER) and passes <= set(graph)
    for name in passes:
        assert not graph[name] & (passes - {name}), f"{name} imports {sorted(graph[name] & passes)}"


def test_the_house_test_tooling_and_class_sizes() -> None:
    """Test tooling (fuzzers, payloads) lives in mixexport/testing/, not the package root; no class
    grows past ~250 lines (split it: the runtime's caches live in mixexport/caches.py)."""
    import ast

    assert not sorted(p.name for p in (ROOT / "mixexport").glob("*fuzz*.py"))
    big = []
    for folder in PACKAGE_DIRS.values():
        for f in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 260:
                    big.append(f"{f.relative_to(ROOT)}:{node.name}")
    assert not big, big

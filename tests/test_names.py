"""The one name rule (:mod:`mixexport.names`) for segment, tensor and cache names: what it accepts
(every name the families and passes write), what it refuses, and that every reader applies it when
the manifest is read: ``read_manifest`` (so ``verify``, ``inspect``, ``Runtime.open`` and the Triton
writer) and the C++ reader (``examples/cpp/bundle.hpp``, the same message)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from mixexport.bundle import read_manifest
from mixexport.errors import BadInputError
from mixexport.names import MAX_NAME, is_safe_name, name_problem
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]

#: what the nine families and the passes write (surveyed: see mixexport/names.py), and .pt2 names
WRITTEN = ["model", "cache", "user", "item", "user_cat", "seq_items", "seq_behaviours", "item_cat", "item_dense",
           "logit", "user_index", "state_0", "state_11", "cache_8", "kv", "output", "output_3", "x", "_private",
           "0", "layer.0.attn", "a-b", "a" * MAX_NAME, "a..b"]

#: (name, why): paths, quotes and config syntax, whitespace and control characters, unicode look-alikes
HOSTILE = [
    ("../../../X", "it holds '/'"), ("/etc/passwd", "it holds '/'"), ("a/b", "it holds '/'"),
    ("a\\b", "it holds '\\\\'"), ("..", "it starts with '.'"), (".", "it starts with '.'"),
    (".hidden", "it starts with '.'"), ("-rf", "it starts with '-'"), ("", "it is empty"),
    ('x" } parameters { key: "EXECUTION_ENV_PATH', "it holds '\"'"), ("a'b", "it holds \"'\""),
    ("a b", "it holds ' '"), ("a\nb", "it holds '\\n'"), ("a\x00b", "it holds '\\x00'"),
    ("caf\u00e9", "it holds '\u00e9'"), ("\u0430dmin", "it holds '\u0430'"), ("a" * (MAX_NAME + 1), "more than 128"),
    ("C:x", "it holds ':'"), ("x{y}", "it holds '{'"), ("a#b", "it holds '#'"),
]


@pytest.mark.parametrize("name", WRITTEN)
def test_rule_accepts_what_mixexport_writes(name: str) -> None:
    assert name_problem(name) is None and is_safe_name(name)


@pytest.mark.parametrize(("name", "why"), HOSTILE, ids=[repr(h[0])[:24] for h in HOSTILE])
def test_rule_refuses_hostile_names(name: str, why: str) -> None:
    problem = name_problem(name)
    assert problem is not None and why in problem, problem
    assert not is_safe_name(name)


def test_rule_refuses_non_strings() -> None:
    for value in (None, 3, ["a"], b"abc"):
        assert name_problem(value) is not None


def _set(*path: Any) -> Callable[[dict[str, Any], str], None]:
    def edit(m: dict[str, Any], name: str) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = name
    return edit


#: every place a manifest names a segment or tensor, with the entry the error names
PLACES = {
    "segment": (_set("segments", 0, "name"), "segments[0].name"),
    "segment input": (_set("segments", 0, "inputs", 1, "name"), "segments[0].inputs[1].name"),
    "segment output": (_set("segments", 0, "outputs", 0, "name"), "segments[0].outputs[0].name"),
    "model input": (_set("model", "inputs", 0, "name"), "model.inputs[0].name"),
    "model output": (_set("model", "outputs", 0, "name"), "model.outputs[0].name"),
}


def _edit(bundle: Path, edit: Callable[[dict[str, Any], str], None], name: str) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data, name)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("place", PLACES)
def test_every_reader_refuses_a_bad_name_when_the_manifest_is_read(place: str, bundle_copy: Path) -> None:
    """read_manifest, and through it verify / inspect / triton: one line, exit 2, naming the entry."""
    edit, where = PLACES[place]
    for name, why in HOSTILE[:12]:
        _edit(bundle_copy, edit, name)
        with pytest.raises(BadInputError) as e:
            read_manifest(bundle_copy)
        if name and name.isprintable():
            assert f"{where} is " in e.value.message and "breaks the name rule" in e.value.message, e.value.message
            assert why in e.value.message, e.value.message
        else:  # empty or a control character: refused by the string check that runs before the rule
            assert f"{where} must be 1 to" in e.value.message, e.value.message
    _edit(bundle_copy, edit, "../../../X")
    for args in (["verify", str(bundle_copy)], ["inspect", str(bundle_copy)],
                 ["triton", str(bundle_copy), "--out", str(bundle_copy.parent / "repo"), "--flavour", "native"]):
        r = run_cli(*args)
        assert r.code == 2 and "breaks the name rule" in r.err and "Traceback" not in r.err, (args, r.err)
    assert sorted(p.name for p in bundle_copy.parent.iterdir()) == ["bundle"]
    assert not (bundle_copy.parent.parent / "X").exists()


def test_cache_name_and_role_keys_follow_the_rule(bundle_copy: Path) -> None:
    """model.roles keys are tensor names too (a cache's name is checked the same way, in
    tests/serving/test_triton_repo.py on a KV bundle)."""
    _edit(bundle_copy, lambda m, n: m["model"].__setitem__("roles", {n: "user"}), "a/b")
    with pytest.raises(BadInputError, match=r"model.roles key is 'a/b', which breaks the name rule"):
        read_manifest(bundle_copy)


@pytest.fixture(scope="module")
def cpp_reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A five-line program around examples/cpp/bundle.hpp's ``mixbundle::load`` (header-only; needs
    g++ and nlohmann-json3-dev, which scripts/setup.sh installs)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to compile the C++ reader")
    d = tmp_path_factory.mktemp("cpp")
    (d / "read.cpp").write_text(
        '#include "bundle.hpp"\n#include <iostream>\nint main(int, char** argv) {\n'
        "  try { mixbundle::load(argv[1]); } catch (const std::exception& e) {\n"
        '    std::cerr << "error: " << e.what() << "\\n"; return 1; }\n  return 0;\n}\n')
    r = subprocess.run(["g++", "-std=c++17", "-O0", "-I", str(ROOT / "examples" / "cpp"), str(d / "read.cpp"),
                        "-o", str(d / "read"), "-lcrypto"], capture_output=True, text=True)
    if r.returncode != 0 and "nlohmann/json.hpp" in r.stderr:
        pytest.skip("nlohmann-json3-dev is not installed (scripts/setup.sh installs it)")
    assert r.returncode == 0, r.stderr
    return d / "read"


@pytest.mark.parametrize("place", ["segment", "segment output", "model output"])
def test_cpp_reader_refuses_the_same_names_with_the_same_message(place: str, cpp_reader: Path,
                                                                 bundle_copy: Path) -> None:
    edit, _ = PLACES[place]
    assert subprocess.run([str(cpp_reader), str(bundle_copy)], capture_output=True).returncode == 0
    for name, _why in HOSTILE[1:11] + HOSTILE[16:17]:
        if "'" in name or not name:  # Python's repr switches to double quotes; empty fails an earlier check
            continue
        _edit(bundle_copy, edit, name)
        with pytest.raises(BadInputError) as e:
            read_manifest(bundle_copy)
        r = subprocess.run([str(cpp_reader), str(bundle_copy)], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.splitlines() == [f"error: {e.value.message}"], (r.stderr, e.value)

"""TensorRT / TensorRT-RTX backends: everything that does not need the library — ``--shapes``
parsing, optimization profiles from the specs, engine names, manifest entries, option routing —
and the exit-3 path through the real CLI when the library is absent (as on CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mixexport.backends import get_backend
from mixexport.backends.tensorrt import (DEFAULT_PROFILE, TensorRTBackend, TensorRTRtxBackend, axis_profile,
                                         check_shapes_apply, derive_profile, engine_entries, engine_path,
                                         parse_shapes, timing_cache_path)
from mixexport.bundle import Segment
from mixexport.errors import BadInputError
from mixexport.specs import TensorSpec

MIXEXPORT = str(Path(sys.executable).parent / "mixexport")
USER = TensorSpec("user_cat", "int64", ("users", 5), "user")
STATE = TensorSpec("state", "float32", ("users", 8, 64), "state")
ITEM = TensorSpec("item_dense", "float32", ("candidates", 19), "item")
INDEX = TensorSpec("user_index", "int64", ("candidates",), "index")


def test_parse_shapes() -> None:
    assert parse_shapes([]) == {}
    assert parse_shapes(["candidates:1,64,512", " users:1,2,8 "]) == {"candidates": (1, 64, 512), "users": (1, 2, 8)}


@pytest.mark.parametrize("spec,message", [
    ("candidates", "expected NAME:MIN,OPT,MAX"),
    ("candidates:1,2", "expected NAME:MIN,OPT,MAX"),
    ("candidates:1,2,x", "expected NAME:MIN,OPT,MAX"),
    (":1,2,3", "expected NAME:MIN,OPT,MAX"),
    ("candidates:0,2,3", "sizes must be >= 1"),
    ("candidates:4,2,8", "need MIN <= OPT <= MAX, found 4, 2, 8"),
    ("candidates:1,9,8", "need MIN <= OPT <= MAX"),
])
def test_parse_shapes_errors(spec: str, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        parse_shapes([spec])


def test_parse_shapes_refuses_duplicates() -> None:
    with pytest.raises(BadInputError, match="axis 'batch' twice"):
        parse_shapes(["batch:1,2,3", "batch:1,2,4"])


def test_profile_from_specs_defaults_and_overrides() -> None:
    prof = derive_profile([USER, STATE, ITEM, INDEX], {"candidates": (1, 64, 512)})
    lo, opt, hi = DEFAULT_PROFILE["users"]
    assert prof["user_cat"] == ((lo, 5), (opt, 5), (hi, 5))              # static dims stay fixed
    assert prof["state"] == ((lo, 8, 64), (opt, 8, 64), (hi, 8, 64))
    assert prof["item_dense"] == ((1, 19), (64, 19), (512, 19))          # the override wins
    assert prof["user_index"] == ((1,), (64,), (512,))                   # same axis, same profile
    full = derive_profile([TensorSpec("x", "float32", ("batch", 3), "item")], {})
    assert full["x"] == ((1, 3), (256, 3), (4096, 3))


def test_defaults_are_ordered() -> None:
    for name, (lo, opt, hi) in DEFAULT_PROFILE.items():
        assert 1 <= lo <= opt <= hi, name


def test_axis_without_default_names_the_fix() -> None:
    with pytest.raises(BadInputError, match="'history' has no default") as e:
        axis_profile("history", {})
    assert e.value.hint == "give it one: --shapes history:MIN,OPT,MAX"
    assert axis_profile("history", {"history": (1, 2, 3)}) == (1, 2, 3)


def test_shapes_must_name_an_axis_of_the_bundle() -> None:
    segs = [Segment("user", "user", (USER,), (STATE,)), Segment("item", "item", (STATE, ITEM, INDEX), ())]
    check_shapes_apply({"users": (1, 1, 4), "candidates": (1, 2, 3)}, segs)
    with pytest.raises(BadInputError, match=r"axes \['candidate'\] that no segment input has"):
        check_shapes_apply({"candidate": (1, 2, 3)}, segs)


def test_engine_names_and_manifest_entries() -> None:
    assert engine_path("item", "tensorrt", "sm90") == "engines/item.tensorrt.sm90.plan"
    assert engine_entries(["user", "item"], "tensorrt-rtx", "sm86") == {
        "user": {"tensorrt-rtx": "engines/user.tensorrt-rtx.sm86.plan"},
        "item": {"tensorrt-rtx": "engines/item.tensorrt-rtx.sm86.plan"}}


def test_session_options_recorded_in_manifest() -> None:
    opts = TensorRTBackend(shapes={"candidates": (1, 8, 64)}, version_compatible=True).session_options()
    assert opts["strongly_typed"] is True and opts["version_compatible"] is True and opts["device"] == "cuda"
    assert opts["profile"]["candidates"] == [1, 8, 64] and opts["profile"]["users"] == list(DEFAULT_PROFILE["users"])


def test_timing_cache_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MIXEXPORT_TIMING_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert timing_cache_path("tensorrt", "10.9.0", "sm90") == tmp_path / "mixexport/tensorrt-10.9.0-sm90.timing-cache"
    monkeypatch.setenv("MIXEXPORT_TIMING_CACHE", str(tmp_path / "shared.cache"))
    assert timing_cache_path("tensorrt", "10.9.0", "sm90") == tmp_path / "shared.cache"


def test_options_route_to_the_backends_that_take_them() -> None:
    with pytest.raises(BadInputError, match="--shapes, --version-compatible does not apply to backend onnxruntime"):
        get_backend("onnxruntime", settings={"shapes": {"batch": (1, 2, 3)}, "version_compatible": True})
    get_backend("onnxruntime", settings={"shapes": {}, "version_compatible": False})  # unset: fine
    backend = get_backend("tensorrt", "cuda", require=False, settings={"shapes": {"batch": (1, 2, 3)}})
    assert backend.shapes == {"batch": (1, 2, 3)} and backend.version_compatible is False
    with pytest.raises(BadInputError, match="run on CUDA GPUs only"):
        TensorRTBackend(device="cpu")


@pytest.mark.parametrize("cls,extra,module", [(TensorRTBackend, "trt", "tensorrt"),
                                              (TensorRTRtxBackend, "trt-rtx", "tensorrt_rtx_bindings")])
def test_unavailable_reason_names_the_package(cls: type, extra: str, module: str) -> None:
    reason = cls().unavailable_reason()
    if reason is None:
        pytest.skip(f"{module} and a GPU are present here")
    if "not installed" in reason:
        assert f"(Python module {module})" in reason and reason.endswith(f'pip install "mixexport[{extra}]"')
    assert "\n" not in reason


@pytest.mark.parametrize("target,cls,extra", [("trt", TensorRTBackend, "trt"), ("trt-rtx", TensorRTRtxBackend, "trt-rtx")])
def test_build_exits_3_without_the_library(tiny_ckpt: Path, tmp_path: Path, target: str, cls: type,
                                           extra: str) -> None:
    if cls().unavailable_reason() is None:
        pytest.skip(f"{cls.label} and a GPU are present: the exit-3 path does not apply")
    out = tmp_path / "bundle"
    r = subprocess.run([MIXEXPORT, "build", str(tiny_ckpt), "--target", target, "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cls.label}"), r.stderr
    assert "not installed" not in lines[0] or lines[0].endswith(f'pip install "mixexport[{extra}]"')
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no bundle, no temp dir


def test_import_is_lazy() -> None:
    code = ("import sys, mixexport.backends, mixexport.backends.tensorrt as t\n"
            "t.parse_shapes(['batch:1,2,3'])\n"
            "print([m for m in ('tensorrt', 'tensorrt_rtx_bindings', 'tensorrt_rtx') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

"""TensorRT / TensorRT-RTX backends: everything that does not need the library — ``--shapes``
parsing, optimization profiles from the specs, engine names, manifest entries, option routing —
and the exit-3 path through the real CLI when the library is absent (as on CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixexport.backends import get_backend
from mixexport.backends.tensorrt import (DEFAULT_PROFILE, RTX_DEFAULT_ARCHS, TensorRTBackend, TensorRTRtxBackend,
                                         axis_profile, check_shapes_apply, derive_profile, engine_entries,
                                         engine_path, parse_arch, parse_shapes, resolve_axes, timing_cache_path)
from mixexport.backends.trt_build import int8_engine_check
from mixexport.bundle import Segment
from mixexport.errors import BadInputError
from mixexport.specs import TensorSpec
from tests.cli_helpers import MIXEXPORT

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
                                              (TensorRTRtxBackend, "trt-rtx", "tensorrt_rtx")])
def test_unavailable_reason_names_the_package(cls: type, extra: str, module: str) -> None:
    reason = cls().unavailable_reason()
    if reason is None:
        pytest.skip(f"{module} and a GPU are present here")
    if "not installed" in reason:
        assert f"(Python module {module})" in reason and reason.endswith(f'pip install "mixexport[{extra}]"')
    assert "\n" not in reason


def _hide(tmp_path: Path, modules: tuple[str, ...]) -> dict[str, str]:
    """An environment in which importing ``modules`` fails as on a machine without them."""
    shadow = tmp_path / "shadow"
    for m in modules:
        (shadow / m).mkdir(parents=True)
        (shadow / m / "__init__.py").write_text(f"raise ImportError('{m} hidden by the test')\n")
    return {**os.environ, "PYTHONPATH": str(shadow)}


@pytest.mark.parametrize("target,cls,extra", [("trt", TensorRTBackend, "trt"), ("trt-rtx", TensorRTRtxBackend, "trt-rtx")])
def test_build_exits_3_without_the_library(tiny_ckpt: Path, tmp_path: Path, target: str, cls: type,
                                           extra: str) -> None:
    """Without the library (hidden here when installed) the build stops before anything is written."""
    env = _hide(tmp_path, cls.modules)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "bundle"
    r = subprocess.run([MIXEXPORT, "build", str(tiny_ckpt), "--target", target, "--out", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cls.label}"), r.stderr
    assert lines[0].endswith(f'pip install "mixexport[{extra}]"')
    assert not out.exists() and list(work.iterdir()) == []  # no bundle, no temp dir


def test_trt_needs_a_gpu_to_build_rtx_does_not() -> None:
    """TensorRT proper builds for the GPU it runs on; TensorRT-RTX's build needs only the library."""
    assert TensorRTBackend.builds_without_gpu is False and TensorRTRtxBackend.builds_without_gpu is True
    rtx = TensorRTRtxBackend()
    if rtx._library_reason() is None:
        assert rtx.build_unavailable_reason() is None
    trt = TensorRTBackend()
    if trt._library_reason() is None and trt._gpu_reason() is not None:
        assert trt.build_unavailable_reason() == trt._gpu_reason()


def test_parse_arch() -> None:
    assert parse_arch("sm80,sm86") == ("sm80", "sm86")
    assert parse_arch("8.6, 12.0,sm_89") == ("sm86", "sm120", "sm89")
    assert parse_arch(None) == () and parse_arch("") == ()
    with pytest.raises(BadInputError, match="expected a compute capability like sm86"):
        parse_arch("ampere")
    with pytest.raises(BadInputError, match="gives sm86 twice"):
        parse_arch("sm86,8.6")


def test_arch_options_route() -> None:
    rtx = TensorRTRtxBackend(arch=("sm86",))
    assert rtx.session_options()["archs"] == ["sm86"] and rtx.target_archs() == ("sm86",)
    assert TensorRTRtxBackend().target_archs() == RTX_DEFAULT_ARCHS
    with pytest.raises(BadInputError, match="TensorRT builds for the GPU it runs on"):
        TensorRTBackend(arch=("sm86",))
    with pytest.raises(BadInputError, match="--version-compatible is not supported by TensorRT-RTX"):
        TensorRTRtxBackend(version_compatible=True)
    assert TensorRTRtxBackend.PASS_DEFAULTS == {"quantize-w8a16": {"embedding_form": "dequantize-first"}}


def test_profiles_follow_what_the_model_declares() -> None:
    """LONGER: seq = merge · groups, groups >= recent; ``groups + 3`` follows groups."""
    mult, mins = {"seq": ["groups", 3]}, {"groups": 8}
    boxes = resolve_axes({"users", "seq", "groups", "groups + 3"}, {}, mult, mins)
    assert boxes["groups"] == (8, 43, 341)                     # from seq's default 1/128/1024, raised to 8
    assert boxes["seq"] == (24, 129, 1023)                     # whole multiples of 3
    assert boxes["groups + 3"] == (11, 46, 344) and boxes["users"] == DEFAULT_PROFILE["users"]
    assert resolve_axes({"groups"}, {}, mult, mins)["groups"] == (8, 43, 341)  # seq itself absent
    assert resolve_axes({"seq"}, {"seq": (30, 60, 90)}, mult, mins)["seq"] == (30, 60, 90)
    assert resolve_axes({"seq"}, {"seq": (31, 61, 92)}, mult, mins)["seq"] == (33, 60, 90)
    with pytest.raises(BadInputError, match="below the 8 the model needs"):
        resolve_axes({"groups"}, {"groups": (1, 2, 4)}, mult, mins)
    with pytest.raises(BadInputError, match="disagree"):
        resolve_axes({"seq", "groups"}, {"seq": (30, 60, 90), "groups": (8, 9, 10)}, mult, mins)
    with pytest.raises(BadInputError, match="uses an operation profiles cannot derive"):
        resolve_axes({"groups ** 2"}, {"groups": (8, 8, 8)})
    prof = derive_profile([TensorSpec("seq_items", "int64", ("users", "seq"), "sequence"),
                           TensorSpec("k", "float32", ("users", 4, "groups", 16), "state")], {}, mult, mins)
    assert prof["seq_items"][0] == (1, 24) and prof["k"][2] == (256, 4, 341, 16)


def test_int8_engine_check_rule() -> None:
    assert int8_engine_check(30, 100, 80)["status"] == "PASS"          # saved 70 of 80
    assert int8_engine_check(95, 100, 80)["status"] == "FAIL"          # saved 5 of 80: folded
    assert int8_engine_check(98, 100, 10)["status"] == "inconclusive"  # kernels dominate the engine
    assert int8_engine_check(30, 100, 80)["ratio"] == 0.3


def test_import_is_lazy() -> None:
    code = ("import sys, mixexport.backends, mixexport.backends.tensorrt as t\n"
            "t.parse_shapes(['batch:1,2,3'])\n"
            "print([m for m in ('tensorrt', 'tensorrt_rtx_bindings', 'tensorrt_rtx') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

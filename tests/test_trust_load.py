"""What is loaded is exactly what was checked (docs/security.md, "Loading exactly the bytes that
were checked"), and the smaller refusals of a bundle's content.

Each class of attack on a copy of a real bundle, with the real backends (ONNX Runtime, AOTInductor):

- a file swapped on disk *after* its sha256 was checked and before the session is created (a hook
  on the real :func:`mixexport.checked_load.read_checked` swaps it right after the hash): the
  session must run the checked bytes — the scores of the untouched bundle — whatever is on disk now;
- a file swapped between the path check and the open: refused, even when the file swapped in has
  the very bytes of the original (the path rule holds for the file actually opened);
- a node in a custom-op domain, ONNX Runtime's reserved in-memory external-data location, and a
  boolean where the manifest wants an integer: one error line, the documented exit code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from onnx import helper

from mixexport import checked_load
from mixexport.bundle import read_manifest
from mixexport.errors import BadInputError, IntegrityError
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.trust import location_problem
from tests.cli_helpers import run_cli
from tests.test_trust import (RULE, _relocate_external_data, aoti_copy, assert_refused, edit_manifest,  # noqa: F401
                              ext_bundle, ext_copy, rehash, sessions)

SEGMENT = "segments/model.onnx"
DATA = "segments/model.onnx.data"


def scores(bundle: Path, ckpt: Path) -> np.ndarray:
    req = load_source(ckpt).example_request(2, 8, seed=3)
    with Runtime.open(bundle) as rt:
        return rt.score(req)["logit"]


@pytest.fixture
def after_check(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[[Path], None]]:
    """{bundle-relative path: swap}: ``swap(path)`` runs right after the real ``read_checked`` has
    read and hashed that file, i.e. after the check and before any session is created."""
    swaps: dict[str, Callable[[Path], None]] = {}
    real = checked_load.read_checked

    def hooked(root: Path, files: Any, rel: str, *args: Any, **kw: Any) -> checked_load.CheckedFile:
        out = real(root, files, rel, *args, **kw)
        if rel in swaps:
            swaps.pop(rel)(Path(root) / rel)
        return out

    monkeypatch.setattr(checked_load, "read_checked", hooked)
    return swaps


def _garbage(tmp: Path, size: int) -> Path:
    out = tmp / "outside.bin"
    out.write_bytes(bytes(range(256)) * (size // 256 + 1))
    return out


# --------------------------------------------------------------------------------------------
# 1. swapped after the check: the checked bytes are what runs

@pytest.mark.parametrize("how", ["symlink to a file outside", "rewritten in place", "deleted"])
def test_segment_swapped_after_check(bundle_copy: Path, tiny_ckpt: Path, tmp_path: Path, how: str,
                                     after_check: dict[str, Callable[[Path], None]]) -> None:
    want = scores(bundle_copy, tiny_ckpt)

    def swap(path: Path) -> None:
        size = path.stat().st_size
        if how == "symlink to a file outside":
            path.unlink()
            path.symlink_to(_garbage(tmp_path, size))
        elif how == "rewritten in place":  # same inode, other bytes: a memory map of it would see them
            with open(path, "r+b") as f:
                f.write(b"\0" * size)
        else:
            path.unlink()

    after_check[SEGMENT] = swap
    got = scores(bundle_copy, tiny_ckpt)
    assert not after_check, "the hook did not run"
    np.testing.assert_array_equal(got, want)
    with pytest.raises(IntegrityError):  # the disk did change: a fresh open refuses it
        Runtime.open(bundle_copy)


@pytest.mark.parametrize("how", ["replaced by rename", "zeroed in place", "deleted"])
def test_external_data_swapped_after_check(ext_copy: Path, tiny_ckpt: Path, how: str,  # noqa: F811
                                           after_check: dict[str, Callable[[Path], None]]) -> None:
    want = scores(ext_copy, tiny_ckpt)

    def swap(path: Path) -> None:
        size = path.stat().st_size
        if how == "replaced by rename":  # loadable zeros: a re-read would score differently, not fail
            other = path.with_name("other.data")
            other.write_bytes(b"\0" * size)
            os.replace(other, path)
        elif how == "zeroed in place":
            with open(path, "r+b") as f:
                f.write(b"\0" * size)
        else:
            path.unlink()

    after_check[DATA] = swap
    got = scores(ext_copy, tiny_ckpt)
    assert not after_check, "the hook did not run"
    np.testing.assert_array_equal(got, want)
    if how != "deleted":
        with pytest.raises(IntegrityError, match=f"{DATA} does not match its sha256"):
            Runtime.open(ext_copy)
        with Runtime.open(ext_copy, verify_files=False) as rt:  # the swapped bytes do score otherwise
            assert not np.array_equal(rt.score(load_source(tiny_ckpt).example_request(2, 8, seed=3))["logit"], want)


@pytest.mark.parametrize("how", ["symlink to a file outside", "rewritten in place"])
def test_aoti_package_swapped_after_check(aoti_copy: Path, tiny_ckpt: Path, tmp_path: Path,  # noqa: F811
                                          how: str, after_check: dict[str, Callable[[Path], None]]) -> None:
    rel = read_manifest(aoti_copy).segments[0].engines["aoti"]
    want = scores(aoti_copy, tiny_ckpt)

    def swap(path: Path) -> None:
        size = path.stat().st_size
        if how == "symlink to a file outside":
            path.unlink()
            path.symlink_to(_garbage(tmp_path, size))
        else:
            with open(path, "r+b") as f:
                f.write(b"\0" * size)

    after_check[rel] = swap
    got = scores(aoti_copy, tiny_ckpt)
    assert not after_check, "the hook did not run"
    np.testing.assert_array_equal(got, want)


def test_private_copy_is_private(tmp_path: Path) -> None:
    with checked_load.private_copy(b"abc", "package.pt2") as path:
        assert path.read_bytes() == b"abc"
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert not path.parent.exists()


# --------------------------------------------------------------------------------------------
# 2. swapped between the path check and the open: refused, even with the same bytes

@pytest.mark.parametrize("how", ["link stays", "swapped back after the open"])
def test_file_swapped_while_opening(bundle_copy: Path, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch,
                                    sessions: list[str]) -> None:  # noqa: F811
    path = bundle_copy / SEGMENT
    outside = tmp_path / "outside.onnx"
    shutil.copy(path, outside)  # same bytes, same sha256: only the path rule can tell
    real = checked_load.resolve_inside
    calls: list[str] = []

    def hooked(root: Path, rel: object, where: str) -> Path:
        if rel == SEGMENT:
            calls.append(str(rel))
            if len(calls) == 2 and how == "swapped back after the open":
                path.unlink()
                os.replace(tmp_path / "original.onnx", path)
        out = real(root, rel, where)
        if rel == SEGMENT and len(calls) == 1:  # checked: now the swap, before the open
            os.replace(path, tmp_path / "original.onnx")
            path.symlink_to(outside)
        return out

    monkeypatch.setattr(checked_load, "resolve_inside", hooked)
    with pytest.raises(IntegrityError) as e:
        Runtime.open(bundle_copy)
    assert sessions == [] and len(calls) == 2
    assert RULE in e.value.message and "\n" not in e.value.message
    assert ("replaced while opening" if how == "swapped back after the open"
            else "outside the bundle (through a symbolic link)") in e.value.message


# --------------------------------------------------------------------------------------------
# 3. a node in a custom-op domain

def _edit_model(bundle: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    path = bundle / SEGMENT
    model = onnx.load_model(str(path))
    edit(model)
    path.write_bytes(model.SerializeToString())
    rehash(bundle, SEGMENT)  # as an attacker editing the manifest too would


def _custom_in_graph(m: onnx.ModelProto) -> None:
    m.graph.node[0].domain = "com.example.custom"
    m.opset_import.append(helper.make_opsetid("com.example.custom", 1))


def _custom_in_function(m: onnx.ModelProto) -> None:
    body = helper.make_node("Evil", ["x"], ["y"], domain="com.example.custom")
    m.functions.append(helper.make_function("local.fns", "f", ["x"], ["y"], [body],
                                            [helper.make_opsetid("", 21), helper.make_opsetid("com.example.custom", 1)]))
    m.opset_import.append(helper.make_opsetid("local.fns", 1))


@pytest.mark.parametrize("edit,op", [(_custom_in_graph, None), (_custom_in_function, "'Evil'")],
                         ids=["main graph", "function body"])
def test_custom_op_domain_is_refused(bundle_copy: Path, edit: Callable[[onnx.ModelProto], None], op: str | None,
                                     sessions: list[str]) -> None:  # noqa: F811
    _edit_model(bundle_copy, edit)
    msg = assert_refused(bundle_copy, sessions, SEGMENT, "of the custom-op domain 'com.example.custom'",
                         *([f"is op {op}"] if op else []))
    assert "'com.microsoft'" in msg


def test_standard_domain_spellings_load(bundle_copy: Path, tiny_ckpt: Path) -> None:
    want = scores(bundle_copy, tiny_ckpt)
    _edit_model(bundle_copy, lambda m: [n.__setattr__("domain", "ai.onnx") for n in m.graph.node[:3]])
    np.testing.assert_array_equal(scores(bundle_copy, tiny_ckpt), want)


# --------------------------------------------------------------------------------------------
# 4. ONNX Runtime's reserved in-memory external-data location

@pytest.mark.parametrize("location", ["*/_ORT_MEM_ADDR_/*", "./*/_ORT_MEM_ADDR_/*", "*/_ort_mem_addr_/*"])
def test_reserved_memory_location_is_refused(ext_copy: Path, location: str, sessions: list[str]) -> None:  # noqa: F811
    # the attacker also ships a file at that path and lists its sha256: only the reserved name refuses it
    planted = ext_copy / "segments" / location
    planted.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ext_copy / DATA, planted)
    _relocate_external_data(ext_copy, location)
    rehash(ext_copy, os.path.normpath(f"segments/{location}"))
    assert_refused(ext_copy, sessions, "external-data location of tensor", SEGMENT, repr(location),
                   "ONNX Runtime's reserved in-memory location '*/_ORT_MEM_ADDR_/*'")
    assert location_problem("weights/_ORT_MEM_ADDR_.bin") is not None and location_problem("w.data") is None


# --------------------------------------------------------------------------------------------
# 5. booleans are not integers in the manifest

@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(schema_version=True), "schema_version must be an integer, found a boolean"),
    (lambda d: d["segments"][0]["inputs"][0]["shape"].__setitem__(0, True), "shape[0] must be an integer"),
    (lambda d: d["segments"][0]["session_options"].update(intra_op_num_threads=True),
     "intra_op_num_threads must be an integer, found a boolean"),
], ids=["schema_version", "shape dim", "thread count"])
def test_booleans_are_not_integers(bundle_copy: Path, edit: Callable[[dict[str, Any]], None], message: str) -> None:
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BadInputError, match=re.escape(message)):
        read_manifest(bundle_copy)
    r = run_cli("inspect", str(bundle_copy))
    assert r.code == 2 and message in r.err and "Traceback" not in r.err


def test_skeleton_reads_what_a_full_parse_reads(ext_bundle: Path, tiny_bundle: Path) -> None:  # noqa: F811
    """The weights-free view the rules read (nodes, graph I/O, external initializers) equals a full
    parse, for an inline model and one with external data; an initializer that claims external data
    without a location is kept, so the rule refuses it."""
    from mixexport.trust import model_locations, onnx_skeleton

    for bundle in (ext_bundle, tiny_bundle):
        data = (bundle / SEGMENT).read_bytes()
        full, skeleton = onnx.ModelProto(), onnx_skeleton(data)
        full.ParseFromString(data)
        assert skeleton.graph.node == full.graph.node and skeleton.graph.input == full.graph.input
        assert skeleton.opset_import == full.opset_import
        assert model_locations(skeleton, SEGMENT, True) == model_locations(full, SEGMENT, True)
    full.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    with pytest.raises(IntegrityError, match="is stored externally but names no location"):
        model_locations(onnx_skeleton(full.SerializeToString()), SEGMENT, True)
    with pytest.raises(ValueError):
        onnx_skeleton(data[:-3])

"""A bundle is a trust boundary: nothing outside it is read, nothing unverified is loaded.

Each class of attack is tried as a new user would, on a copy of a real bundle altered by hand: a
manifest path leaving the bundle (relative with ``..``, absolute), a segment file replaced by a
symbolic link to a file outside, an ONNX external-data location leaving the bundle, and bytes
changed after the build. Each must be refused by ``verify`` (exit 1, one ``error:`` line naming
the path and the rule, no traceback) and by ``Runtime.open`` (a MixexportError before any session
is created).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import onnx
import pytest

from mixexport.bundle import check_integrity, read_manifest
from mixexport.errors import BadInputError, GateFailedError, IntegrityError, MixexportError
from mixexport.runtime import Runtime
from mixexport.trust import external_data_files, path_problem
from tests.cli_helpers import run_cli

RULE = "breaks the bundle path rule (relative, no '..', resolving inside the bundle)"


# --------------------------------------------------------------------------------------------
# helpers

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def rehash(bundle: Path, *rels: str) -> None:
    """What an attacker who edits the manifest too would do: record the altered files' sha256."""
    edit_manifest(bundle, lambda d: d["files"].update({rel: sha(bundle / rel) for rel in rels}))


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every ONNX Runtime or AOTI session created (the refusals must come before any)."""
    from mixexport.backends import aoti, onnxruntime

    made: list[str] = []
    for cls in (onnxruntime.OrtSession, aoti.AotiSession):
        original = cls.__init__

        def spy(self: Any, *args: Any, _original: Any = original, _name: str = cls.__name__, **kw: Any) -> None:
            made.append(_name)
            _original(self, *args, **kw)

        monkeypatch.setattr(cls, "__init__", spy)
    return made


def assert_refused(bundle: Path, sessions: list[str], *needles: str, error: type = IntegrityError) -> str:
    """verify: exit 1 with one error line holding every needle; Runtime.open: the same error class
    and message, before any session. Returns the message."""
    r = run_cli("verify", str(bundle), "--no-metrics")
    errors = [line for line in r.err.splitlines() if line.startswith("error: ")]
    assert r.code == error.exit_code, r.err
    assert "Traceback" not in r.err and len(errors) == 1, r.err
    assert all(n in errors[0] for n in needles), (errors[0], needles)
    assert "hint: " in r.err
    sessions.clear()
    with pytest.raises(MixexportError) as e:
        Runtime.open(bundle)
    assert isinstance(e.value, error), e.value
    assert all(n in e.value.message for n in needles if not n.startswith("bundle integrity")), e.value.message
    assert sessions == []
    return e.value.message


@pytest.fixture(scope="session")
def ext_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny rankmixer with its weights in an external-data file (segments/model.onnx.data)."""
    from mixexport.pipeline import BuildOptions, build

    out = tmp_path_factory.mktemp("ext") / "rm-ext"
    build(tiny_ckpt, BuildOptions(out=out, bench=False, metrics=False, external_threshold=0))
    return out


@pytest.fixture
def ext_copy(ext_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ext"
    shutil.copytree(ext_bundle, dst)
    return dst


@pytest.fixture
def aoti_copy(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    from tests.backends.conftest import aoti_bundle_for

    dst = tmp_path / "aoti"
    shutil.copytree(aoti_bundle_for(tiny_ckpt, tmp_path_factory.mktemp("aoti-trust")), dst)
    return dst


# --------------------------------------------------------------------------------------------
# the path rule, on its own

@pytest.mark.parametrize("rel,reason", [
    ("../x.onnx", "climbs out with '..'"), ("segments/../../x", "climbs out with '..'"),
    ("/etc/passwd", "is absolute"), ("C:/x.onnx", "is absolute"), ("segments\\model.onnx", "uses '\\'"),
    ("", "is empty"), ("a\nb", "control or unprintable"), ("a\x00b", "control or unprintable"),
    ("\ud800.onnx", "unprintable"), (7, "not a path string"),
])
def test_path_rule(rel: object, reason: str) -> None:
    assert reason in (path_problem(rel) or "")


def test_path_rule_accepts_plain_paths(tiny_bundle: Path) -> None:
    assert path_problem("segments/model.onnx") is None and path_problem("./inputs/sample.npz") is None
    read_manifest(tiny_bundle).file("segments/model.onnx")


# --------------------------------------------------------------------------------------------
# 1. a manifest path outside the bundle (with the right sha256 for the outside file)

@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_segment_file_outside_the_bundle(bundle_copy: Path, tmp_path: Path, how: str, sessions: list[str]) -> None:
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle_copy / "segments" / "model.onnx", outside)
    rel = "../outside.onnx" if how == "relative" else str(outside)

    def point_outside(d: dict[str, Any]) -> None:
        d["segments"][0]["file"] = rel
        d["files"][rel] = sha(outside)

    edit_manifest(bundle_copy, point_outside)
    reason = "climbs out with '..'" if how == "relative" else "is absolute"
    msg = assert_refused(bundle_copy, sessions, f"{rel!r}", RULE, reason)
    assert msg.startswith("files key ") or msg.startswith("segments[0].file ")


def test_engine_outside_the_bundle(aoti_copy: Path, tmp_path: Path, sessions: list[str]) -> None:
    seg = read_manifest(aoti_copy).segments[0]
    outside = tmp_path / "evil.pt2"
    shutil.copy(aoti_copy / seg.engines["aoti"], outside)
    rel = "engines/../../evil.pt2"
    edit_manifest(aoti_copy, lambda d: d["segments"][0]["engines"].update(aoti=rel))
    assert_refused(aoti_copy, sessions, "segments[0].engines['aoti']", f"{rel!r}", RULE, "climbs out with '..'")


# --------------------------------------------------------------------------------------------
# 2. a segment file replaced by a symbolic link to a file outside the bundle

def test_segment_file_symlinked_outside(bundle_copy: Path, tmp_path: Path, sessions: list[str]) -> None:
    seg = bundle_copy / "segments" / "model.onnx"
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(seg, outside)
    seg.symlink_to(outside)  # same bytes, same sha256: only the path rule catches it
    assert_refused(bundle_copy, sessions, "'segments/model.onnx'", RULE,
                   f"resolves to {outside.resolve()}, outside the bundle (through a symbolic link)")


def test_engine_symlinked_outside(aoti_copy: Path, tmp_path: Path, sessions: list[str]) -> None:
    rel = read_manifest(aoti_copy).segments[0].engines["aoti"]
    outside = tmp_path / "elsewhere.pt2"
    shutil.move(aoti_copy / rel, outside)
    (aoti_copy / rel).symlink_to(outside)
    assert_refused(aoti_copy, sessions, repr(rel), RULE, "outside the bundle (through a symbolic link)")


def test_directory_symlinked_outside(bundle_copy: Path, tmp_path: Path, sessions: list[str]) -> None:
    shutil.move(bundle_copy / "segments", tmp_path / "segs")
    (bundle_copy / "segments").symlink_to(tmp_path / "segs")
    assert_refused(bundle_copy, sessions, RULE, "(through a symbolic link)")


def test_links_inside_the_bundle_are_fine(bundle_copy: Path) -> None:
    seg = bundle_copy / "segments" / "model.onnx"
    shutil.move(seg, bundle_copy / "segments" / "real.onnx")
    seg.symlink_to("real.onnx")
    check_integrity(read_manifest(bundle_copy))
    Runtime.open(bundle_copy).close()


# --------------------------------------------------------------------------------------------
# 3. an ONNX external-data location leaving the bundle

def _relocate_external_data(bundle: Path, location: str) -> None:
    """Point every external tensor of segments/model.onnx at ``location``; keep the manifest
    consistent (the ONNX file's new sha256), as an attacker editing both would."""
    path = bundle / "segments" / "model.onnx"
    model = onnx.load_model(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(model.SerializeToString())
    rehash(bundle, "segments/model.onnx")


def test_ext_bundle_reads_its_external_data(ext_bundle: Path) -> None:
    m = read_manifest(ext_bundle)
    assert external_data_files(m.root, "segments/model.onnx") == ["segments/model.onnx.data"]
    assert m.loaded_files(m.segments[0], "onnxruntime") == ["segments/model.onnx", "segments/model.onnx.data"]
    check_integrity(m)


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_external_data_outside_the_bundle(ext_copy: Path, tmp_path: Path, how: str, sessions: list[str]) -> None:
    outside = tmp_path / "stolen.data"
    shutil.copy(ext_copy / "segments" / "model.onnx.data", outside)
    location = "../../stolen.data" if how == "relative" else str(outside)
    _relocate_external_data(ext_copy, location)
    msg = assert_refused(ext_copy, sessions, "external-data location of tensor", "in segments/model.onnx",
                         repr(location), RULE, "climbs out with '..'" if how == "relative" else "is absolute")
    assert "\n" not in msg


def test_external_data_symlinked_outside(ext_copy: Path, tmp_path: Path, sessions: list[str]) -> None:
    data = ext_copy / "segments" / "model.onnx.data"
    shutil.move(data, tmp_path / "w.data")
    data.symlink_to(tmp_path / "w.data")
    assert_refused(ext_copy, sessions, RULE, "through a symbolic link")


def test_external_data_unlisted_in_files(ext_copy: Path, sessions: list[str]) -> None:
    shutil.copy(ext_copy / "segments" / "model.onnx.data", ext_copy / "segments" / "other.data")
    _relocate_external_data(ext_copy, "other.data")  # inside the bundle, but never hashed by the build
    with pytest.raises(GateFailedError, match="unlisted segments/other.data"):
        check_integrity(read_manifest(ext_copy))
    with pytest.raises(IntegrityError, match="segments/other.data has no sha256 in the manifest's files"):
        Runtime.open(ext_copy)
    assert sessions == []


# --------------------------------------------------------------------------------------------
# 4. bytes changed after the build

def _resave_with_other_bytes(path: Path) -> None:
    """Same graph, different bytes (a loadable file: only the hash can tell)."""
    model = onnx.load_model(str(path), load_external_data=False)
    model.producer_name = "someone-else"
    path.write_bytes(model.SerializeToString())


def test_changed_segment_is_refused_by_open(bundle_copy: Path, sessions: list[str]) -> None:
    _resave_with_other_bytes(bundle_copy / "segments" / "model.onnx")
    msg = assert_refused(bundle_copy, sessions, "segments/model.onnx")
    assert msg == ("segments/model.onnx does not match its sha256 in the manifest (changed after the build); "
                   "refusing to load it")
    r = run_cli("verify", str(bundle_copy))
    assert "error: bundle integrity check failed: changed segments/model.onnx" in r.err
    # a caller that checked the files itself may skip the hashing; the path rule still applies
    Runtime.open(bundle_copy, verify_files=False).close()
    assert sessions == ["OrtSession"]


def test_changed_external_data_is_refused(ext_copy: Path, sessions: list[str]) -> None:
    data = ext_copy / "segments" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    assert_refused(ext_copy, sessions, "segments/model.onnx.data", error=GateFailedError)
    with pytest.raises(IntegrityError, match=r"segments/model.onnx.data does not match its sha256"):
        Runtime.open(ext_copy)


def test_changed_aoti_package_is_refused(aoti_copy: Path, sessions: list[str]) -> None:
    rel = read_manifest(aoti_copy).segments[0].engines["aoti"]
    with open(aoti_copy / rel, "ab") as f:
        f.write(b"\0")
    assert_refused(aoti_copy, sessions, rel, error=GateFailedError)
    with pytest.raises(IntegrityError, match=f"{rel} does not match its sha256 in the manifest"):
        Runtime.open(aoti_copy)
    assert sessions == []


def test_unlisted_and_missing_segment_files(bundle_copy: Path, sessions: list[str]) -> None:
    edit_manifest(bundle_copy, lambda d: d["files"].pop("segments/model.onnx"))
    with pytest.raises(IntegrityError, match="segments/model.onnx has no sha256 in the manifest's files; "
                                             "refusing to load an unverified file"):
        Runtime.open(bundle_copy)
    assert sessions == []


# --------------------------------------------------------------------------------------------
# the manifest itself

def test_manifest_sha256_pin(bundle_copy: Path, sessions: list[str]) -> None:
    digest = sha(bundle_copy / "manifest.json")
    assert read_manifest(bundle_copy, sha256=digest).sha256 == digest
    Runtime.open(bundle_copy, manifest_sha256=digest).close()
    edit_manifest(bundle_copy, lambda d: d.update(notes=["edited"]))
    sessions.clear()
    with pytest.raises(IntegrityError, match=f"not the pinned {digest}"):
        Runtime.open(bundle_copy, manifest_sha256=digest)
    assert sessions == []
    r = run_cli("verify", str(bundle_copy), "--manifest-sha256", digest)
    assert r.code == 1 and f"not the pinned {digest}" in r.err and "Traceback" not in r.err
    r = run_cli("inspect", str(bundle_copy))
    assert f"manifest sha256: {sha(bundle_copy / 'manifest.json')}" in r.out


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["segments"][0]["session_options"].update(optimized_model_path="/tmp/x.onnx"),
     "holds ['optimized_model_path'], which a bundle may not set"),
    (lambda d: d["segments"][0]["session_options"]["config"].update({"ep.context_file_path": "/tmp/x"}),
     "sets 'ep.context_file_path', which a bundle may not set"),
    (lambda d: d["segments"][0]["session_options"]["config"].update({"session.intra_op.allow_spinning": "0\u202e"}),
     "not a value ONNX Runtime takes"),
    (lambda d: d["segments"][0]["session_options"].update(intra_op_num_threads=10**9),
     "intra_op_num_threads must be in [0, 1024]"),
    (lambda d: d["segments"].append(dict(d["segments"][0])), "name segment 'model' twice"),
    (lambda d: d["segments"][0]["inputs"][0].update(shape=["batch", -5]), "shape[1] must be in [0, 2147483647]"),
    (lambda d: d["segments"][0]["outputs"].append(dict(d["segments"][0]["inputs"][0], name="user_cat")),
     "outputs 'user_cat', which a model input already provides"),
    (lambda d: d["segments"][0]["inputs"].append(dict(d["segments"][0]["outputs"][0])),
     "is an output of itself (a cycle between segment inputs and outputs)"),
    (lambda d: d["files"].update({"inputs/sample.npz": "0" * 63}), "must be a sha256"),
])
def test_manifest_refusals(bundle_copy: Path, edit: Callable[[dict[str, Any]], None], message: str,
                           sessions: list[str]) -> None:
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BadInputError) as e:
        Runtime.open(bundle_copy)
    assert message in e.value.message and sessions == []
    r = run_cli("inspect", str(bundle_copy))
    assert r.code == 2 and message in r.err and "Traceback" not in r.err


def test_duplicate_keys_and_constants_are_not_json(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"target": "onnx"', '"target": "onnx", "target": "aoti"'))
    with pytest.raises(BadInputError, match="duplicate key 'target'"):
        read_manifest(bundle_copy)
    path.write_text(text.replace('"schema_version": 1', '"schema_version": NaN'))
    with pytest.raises(BadInputError, match="NaN is not JSON"):
        read_manifest(bundle_copy)


# --------------------------------------------------------------------------------------------
# manifest fuzzing, the CI slice (the long run: scripts/fuzz_manifest.py)

FUZZ_CI = 150  # mutations per bundle


@pytest.fixture(scope="module")
def split_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LONGER bundle: cache, user and item segments and a KV cache spec to mutate."""
    from mixexport.pipeline import BuildOptions, build
    from tests.conftest import make_checkpoint

    root = tmp_path_factory.mktemp("fuzz-split")
    out = root / "lo"
    build(make_checkpoint(root / "lo.pt", family="longer"), BuildOptions(out=out, bench=False, metrics=False))
    return out


def test_fuzz_findings_stay_fixed(split_copy: Path, tmp_path: Path) -> None:
    """Mutations the long fuzz run found crashing (each fixed): refused with one line now."""
    copy = tmp_path / "lo"
    shutil.copytree(split_copy, copy)
    for edit, message in [
        (lambda d: d["caches"][0].update(input=["seq_items"]), "caches[0].input must be a string"),
        (lambda d: d["segments"][0]["session_options"]["config"].update(
            {"session.qdq_matmulnbits_accuracy_level": 10**400}), "not a value ONNX Runtime takes"),
    ]:
        shutil.copy(split_copy / "manifest.json", copy / "manifest.json")
        edit_manifest(copy, edit)
        r = run_cli("inspect", str(copy))
        assert r.code == 2 and message in r.err and "Traceback" not in r.err, r.err
    # a manifest that moves the 'users' axis of user state: refused as inconsistent with itself, and
    # when edited consistently (producer and consumer), as inconsistent with the ONNX file
    shutil.copy(split_copy / "manifest.json", copy / "manifest.json")
    edit_manifest(copy, lambda d: d["segments"][1]["outputs"][0].update(
        shape=d["segments"][1]["outputs"][0]["shape"][::-1]))
    with pytest.raises(BadInputError, match="segment 'item' input 'state_0' has shape"):
        Runtime.open(copy)

    def both(d: dict[str, Any]) -> None:
        for spec in d["segments"][1]["outputs"] + d["segments"][2]["inputs"]:
            if spec["name"] == "state_0":
                spec["shape"] = spec["shape"][::-1]

    shutil.copy(split_copy / "manifest.json", copy / "manifest.json")
    edit_manifest(copy, both)
    with pytest.raises(BadInputError, match="of the manifest does not describe segments/user.onnx: output 'state_0'"):
        Runtime.open(copy)


@pytest.mark.parametrize("which", ["full", "split"])
def test_manifest_fuzz_ci_slice(which: str, bundle_copy: Path, request: pytest.FixtureRequest) -> None:
    from mixexport.testing.manifest_fuzz import KINDS, timed_run

    bundle = bundle_copy if which == "full" else request.getfixturevalue("split_copy")
    before = (bundle / "manifest.json").read_bytes()
    s = timed_run(bundle, FUZZ_CI, seed=0, timeout_s=60, verify_accepted=3)
    assert (bundle / "manifest.json").read_bytes() == before  # restored
    assert s["failures"] == [], s["failures"][:3]
    assert set(s["kinds"]) == set(KINDS)
    for consumer, counts in s["consumers"].items():
        assert counts["failed"] == 0
        assert counts["refused"] >= 0.6 * FUZZ_CI, (consumer, counts)

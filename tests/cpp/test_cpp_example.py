"""``examples/cpp``: the AOTI scorer (built by ``examples/cpp/build.sh`` against the torch wheel's libtorch) on an
AOTI bundle of the tiny rankmixer, and compare its scores with the Python runtime (≤ 1e-5)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixexport.runtime import Runtime
from mixexport.specs import Request
from tests.cli_helpers import edit_manifest
from tests.cpp.manifest_fuzzing import assert_survives_manifest_fuzzing

from ..backends.conftest import aoti_bundle_for
from .conftest import CppBuild

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cpp"
sys.path.insert(0, str(EXAMPLE))
from make_request import write_request  # noqa: E402  (the example's own helper, not a package)


@pytest.fixture(scope="module")
def scorer(cpp_build: CppBuild) -> Path:
    """The AOTI scorer, built by examples/cpp/build.sh from scratch as a user would (tests/cpp/conftest.py)."""
    assert "skipping mixexport_score_trt" in cpp_build.log or "building mixexport_score_trt" in cpp_build.log
    assert "building mixexport_score_aoti" in cpp_build.log, cpp_build.log[-2000:]
    exe = cpp_build.dir / "mixexport_score_aoti"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return aoti_bundle_for(tiny_ckpt, tmp_path_factory.mktemp("aoti"))


def parse_outputs(stdout: str) -> dict[str, np.ndarray]:
    """The scorer prints ``output NAME d0 d1…`` then one line of values per row."""
    outs: dict[str, np.ndarray] = {}
    lines = stdout.strip().splitlines()
    i = 0
    while i < len(lines):
        head = lines[i].split()
        assert head[0] == "output", lines[i]
        name, shape = head[1], tuple(int(d) for d in head[2:])
        rows = shape[0] if shape else 1
        values = [float(v) for line in lines[i + 1:i + 1 + rows] for v in line.split()]
        outs[name] = np.asarray(values, dtype=np.float32).reshape(shape)
        i += 1 + rows
    return outs


def python_scores(bundle: Path, request: Request) -> dict[str, np.ndarray]:
    with Runtime.open(bundle) as rt:
        return rt.score(request)


def test_sample_request_matches_python_runtime(scorer: Path, bundle: Path, tmp_path: Path) -> None:
    write_request(bundle, tmp_path / "req")
    r = subprocess.run([str(scorer), str(bundle), str(tmp_path / "req"), "--repeat", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = parse_outputs(r.stdout)
    sample = Request.from_npz_dict(dict(np.load(bundle / "inputs" / "sample.npz")))
    want = python_scores(bundle, sample)
    assert set(got) == set(want) == {"logit"}
    assert got["logit"].shape == want["logit"].shape == (sample.num_candidates, 1)
    assert np.abs(got["logit"] - want["logit"]).max() <= 1e-5
    assert re.search(r"mean over 3 calls: [0-9.]+ ms \(2 user\(s\) x 16 candidates\)", r.stderr), r.stderr


def test_other_request_sizes(scorer: Path, bundle: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    from mixexport.source import load_source

    req = load_source(tiny_ckpt).example_request(3, 300, seed=5)  # dynamic axes: 3 users, 300 candidates
    d = tmp_path / "req"
    d.mkdir()
    for name, arr in {**req.user, **req.item, "user_index": req.user_index}.items():
        np.save(d / f"{name}.npy", arr)
    r = subprocess.run([str(scorer), str(bundle), str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = parse_outputs(r.stdout)["logit"]
    assert np.abs(got - python_scores(bundle, req)["logit"]).max() <= 1e-5


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AOTI bundle with a user and an item segment (a family whose default passes split it)."""
    from mixexport.models import FAMILIES

    from ..conftest import make_checkpoint

    family = next((n for n, m in FAMILIES.items() if "split-user-item" in m.DEFAULT_PASSES), None)
    if family is None:
        pytest.skip("no family splits into user/item segments by default")
    root = tmp_path_factory.mktemp("split")
    return aoti_bundle_for(make_checkpoint(root / f"{family}.pt", family=family), root)


def test_split_bundle_matches_python_runtime(scorer: Path, split_bundle: Path, tmp_path: Path) -> None:
    from mixexport.bundle import read_manifest

    assert sorted(s.role for s in read_manifest(split_bundle).segments) == ["item", "user"]
    write_request(split_bundle, tmp_path / "req")
    r = subprocess.run([str(scorer), str(split_bundle), str(tmp_path / "req")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sample = Request.from_npz_dict(dict(np.load(split_bundle / "inputs" / "sample.npz")))
    want = python_scores(split_bundle, sample)
    got = parse_outputs(r.stdout)
    assert set(got) == set(want)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= 1e-5, name


def test_bad_request_is_rejected(scorer: Path, bundle: Path, tmp_path: Path) -> None:
    d = tmp_path / "req"
    write_request(bundle, d)
    np.save(d / "user_index.npy", np.array([0, 5] + [0] * 14, dtype=np.int64))  # only 2 users
    r = subprocess.run([str(scorer), str(bundle), str(d)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: user_index[1] = 5 is outside [0, 2)"
    np.save(d / "item_dense.npy", np.zeros((16, 19), dtype=np.float64))
    r = subprocess.run([str(scorer), str(bundle), str(d)], capture_output=True, text=True)
    assert r.returncode == 1 and "input item_dense: expected float32, found float64" in r.stderr


# --------------------------------------------------------------------------------------------
# the bundle as a trust boundary: the C++ scorer refuses what the Python runtime refuses, with the
# same message, before it loads any package (see tests/test_trust.py for the Python side)

@pytest.fixture
def bundle_copy_aoti(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    write_request(dst, tmp_path / "req")
    return dst


def _both_refuse(scorer: Path, bundle: Path, needle: str) -> str:
    """The scorer exits 1 with one ``error:`` line equal to the Python runtime's message."""
    from mixexport.errors import MixexportError

    with pytest.raises(MixexportError) as e:
        Runtime.open(bundle)
    r = subprocess.run([str(scorer), str(bundle), str(bundle.parent / "req")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [f"error: {e.value.message}"], (r.stderr, e.value.message)
    assert needle in e.value.message
    return e.value.message


def test_scorer_refuses_an_engine_outside_the_bundle(scorer: Path, bundle_copy_aoti: Path) -> None:
    rel = json.loads((bundle_copy_aoti / "manifest.json").read_text())["segments"][0]["engines"]["aoti"]
    shutil.copy(bundle_copy_aoti / rel, bundle_copy_aoti.parent / "evil.pt2")
    for escape, reason in (("../evil.pt2", "it climbs out with '..'"),
                           (str(bundle_copy_aoti.parent / "evil.pt2"), "it is absolute")):
        edit_manifest(bundle_copy_aoti, lambda d: d["segments"][0]["engines"].update(aoti=escape))
        _both_refuse(scorer, bundle_copy_aoti, f"segments[0].engines['aoti'] {escape!r} breaks the bundle path "
                                               f"rule (relative, no '..', resolving inside the bundle): {reason}")


def test_scorer_refuses_a_package_symlinked_outside(scorer: Path, bundle_copy_aoti: Path) -> None:
    rel = json.loads((bundle_copy_aoti / "manifest.json").read_text())["segments"][0]["engines"]["aoti"]
    outside = bundle_copy_aoti.parent / "elsewhere.pt2"
    shutil.move(bundle_copy_aoti / rel, outside)
    (bundle_copy_aoti / rel).symlink_to(outside)
    _both_refuse(scorer, bundle_copy_aoti, f"resolves to {outside.resolve()}, outside the bundle (through a symbolic link)")


def test_scorer_refuses_a_changed_or_unlisted_package(scorer: Path, bundle_copy_aoti: Path) -> None:
    rel = json.loads((bundle_copy_aoti / "manifest.json").read_text())["segments"][0]["engines"]["aoti"]
    with open(bundle_copy_aoti / rel, "ab") as f:
        f.write(b"\0")
    _both_refuse(scorer, bundle_copy_aoti, f"{rel} does not match its sha256 in the manifest (changed after the "
                                           "build); refusing to load it")
    edit_manifest(bundle_copy_aoti, lambda d: d["files"].pop(rel))
    _both_refuse(scorer, bundle_copy_aoti, f"{rel} has no sha256 in the manifest's files")


def test_scorer_refuses_duplicate_keys(scorer: Path, bundle_copy_aoti: Path) -> None:
    path = bundle_copy_aoti / "manifest.json"
    path.write_text(path.read_text().replace('"target": "aoti"', '"target": "aoti", "target": "onnx"'))
    r = subprocess.run([str(scorer), str(bundle_copy_aoti), str(bundle_copy_aoti.parent / "req")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == "error: manifest.json is not valid JSON (duplicate key 'target')\n"


def test_scorer_takes_a_manifest_pin(scorer: Path, bundle_copy_aoti: Path) -> None:
    import hashlib

    from mixexport.errors import IntegrityError

    req = str(bundle_copy_aoti.parent / "req")
    digest = hashlib.sha256((bundle_copy_aoti / "manifest.json").read_bytes()).hexdigest()
    r = subprocess.run([str(scorer), str(bundle_copy_aoti), req, "--manifest-sha256", digest.upper()],
                       capture_output=True, text=True)
    assert r.returncode == 0 and parse_outputs(r.stdout)["logit"].shape == (16, 1), r.stderr
    edit_manifest(bundle_copy_aoti, lambda d: d.update(notes=["edited"]))
    with pytest.raises(IntegrityError) as e:
        Runtime.open(bundle_copy_aoti, manifest_sha256=digest)
    r = subprocess.run([str(scorer), str(bundle_copy_aoti), req, "--manifest-sha256", digest],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.splitlines() == [f"error: {e.value.message}"]


def test_scorer_survives_manifest_fuzzing(scorer: Path, bundle_copy_aoti: Path) -> None:
    """Random structural mutations (mixexport.testing.manifest_fuzz): scores or one ``error:`` line, never a
    crash, a hang or a partial answer."""
    assert_survives_manifest_fuzzing(scorer, bundle_copy_aoti, bundle_copy_aoti.parent / "req", "cpp",
                                      refusals=(1,))


def test_bad_ids_are_refused_before_scoring(scorer: Path, bundle: Path, tmp_path: Path) -> None:
    """An id outside its column's vocabulary (this manifest's older ``vocab`` field) is refused, exit 2,
    with the Python runtime's message: never wrapped to another row."""
    d = tmp_path / "req"
    write_request(bundle, d)
    cat = np.load(d / "user_cat.npy")
    cat[0, 2] = -1
    np.save(d / "user_cat.npy", cat)
    r = subprocess.run([str(scorer), str(bundle), str(d)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    vocab = json.loads((bundle / "manifest.json").read_text())["model"]["inputs"][0]["vocab"][2]
    assert r.stderr == (f"error: user input 'user_cat' column 2: 1 id outside its vocabulary (expected 0 <= id < "
                        f"{vocab}), first -1 at index [0, 2]\n")

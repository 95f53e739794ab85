"""Bad ids are refused by the C++ ONNX Runtime scorer before anything runs, with the Python runtime's
message word for word (ranges from the manifest's ``ids``: per-column offsets, hashing, int32)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixexport.errors import BadInputError
from mixexport.runtime import Runtime
from mixexport.specs import Request
from tests.cli_helpers import run_cli
from tests.program.test_ids import _id_model

from .conftest import CppBuild

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "cpp"))
from make_request import write_request, write_request_dir  # noqa: E402  (the example's own helper, not a package)


@pytest.fixture(scope="module")
def exe(cpp_build: CppBuild) -> Path:
    assert "building mixexport_score_ort" in cpp_build.log, cpp_build.log[-2000:]
    return cpp_build.dir / "mixexport_score_ort"


@pytest.fixture(scope="module")
def id_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cpp-ids")
    r = run_cli("build", str(_id_model(root / "ids.pt2")), "--out", str(root / "b"), "--no-bench", "--no-metrics")
    assert r.code == 0, r.err
    return root / "b"


@pytest.mark.parametrize("name,where,value", [
    ("item_feats", (1, 2), 15),   # column 2 owns 15 rows of the shared table
    ("item_feats", (0, 0), -1),
    ("item_hash", (2,), -1),      # hashed: any id >= 0, never a negative one
    ("item_small", (3,), 7),      # int32 ids
    ("seq_items", (0, 1), 40),
])
def test_ort_scorer_refuses_bad_ids_like_python(exe: Path, id_bundle: Path, tmp_path: Path, name: str,
                                                 where: tuple, value: int) -> None:
    sample = Request.from_npz_dict(dict(np.load(id_bundle / "inputs" / "sample.npz")))
    part = "user" if name in sample.user else "item"
    arr = getattr(sample, part)[name].copy()
    arr[where] = value
    req = Request(**{**sample.__dict__, part: {**getattr(sample, part), name: arr}})
    d = write_request_dir(req, tmp_path / "req")
    r = subprocess.run([str(exe), str(id_bundle), str(d)], capture_output=True, text=True, timeout=120)
    with Runtime.open(id_bundle) as rt, pytest.raises(BadInputError) as e:
        rt.score(req)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == f"error: {e.value.message}\n"


def test_ort_scorer_serves_large_hashed_ids(exe: Path, id_bundle: Path, tmp_path: Path) -> None:
    d = tmp_path / "req"
    write_request(id_bundle, d)
    ids = np.load(d / "item_hash.npy")
    np.save(d / "item_hash.npy", np.full_like(ids, 10**12))
    r = subprocess.run([str(exe), str(id_bundle), str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

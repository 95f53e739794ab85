"""``examples/cpp``: build the scorer with cmake + g++ against the torch wheel's libtorch, run it on an
AOTI bundle of the tiny rankmixer, and compare its scores with the Python runtime (≤ 1e-5)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixexport.runtime import Runtime
from mixexport.specs import Request

from ..backends.conftest import aoti_bundle_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cpp"
sys.path.insert(0, str(EXAMPLE))
from make_request import write_request  # noqa: E402  (the example's own helper, not a package)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example built from scratch (configure + compile + link), as a user would."""
    import torch.utils

    if not (shutil.which("cmake") and shutil.which("g++")):
        pytest.skip("cmake and g++ are needed to build examples/cpp")
    build = tmp_path_factory.mktemp("cpp-build")
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    r = subprocess.run(["cmake", "-S", str(EXAMPLE), "-B", str(build),
                        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipping mixexport_score_trt" in r.stdout or "building mixexport_score_trt" in r.stdout
    r = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    exe = build / "mixexport_score_aoti"
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

"""``mixexport build --out/--force`` (:mod:`mixexport.outdir`): an ``--out`` that is, contains or
lies inside an input is refused; ``--force`` replaces only what mixexport wrote (its marker) or an
empty directory; a full disk and a read-only directory are one line with their exit codes and
leave nothing behind. The ``triton`` side is in tests/serving/test_triton_repo.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mixexport.outdir import MARKER
from tests.cli_helpers import run_cli
from tests.mounts import leftovers, tmpfs


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` with its bytes (links followed)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """IN/ holds the checkpoint X.pt, a labelled-data file and a file of the user's own."""
    d = tmp_path / "IN"
    (d / "sub").mkdir(parents=True)
    shutil.copy(tiny_ckpt, d / "X.pt")
    (d / "notes.txt").write_text("the user's own file")
    (d / "sub" / "data.npz").write_bytes(b"labelled rows")
    (tmp_path / "link").symlink_to(d)
    return d


OVERLAPS = [  # (--out relative to tmp_path, extra args, how it overlaps)
    ("IN", [], "contains the checkpoint"),
    ("IN/X.pt", [], "is the checkpoint"),
    ("IN/X.pt/b", [], "lies inside the checkpoint"),
    ("IN/sub/../../IN", [], "contains the checkpoint"),
    ("link", [], "contains the checkpoint"),            # a link to IN
    ("IN/sub", ["--data", "IN/sub/data.npz"], "contains the --data"),
    ("IN/sub/data.npz", ["--data", "IN/sub/data.npz"], "is the --data"),
]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize(("out", "extra", "how"), OVERLAPS, ids=[o[0] + "".join(o[1][:1]) for o in OVERLAPS])
def test_out_overlapping_an_input_is_refused(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             out: str, extra: list[str], how: str, force: bool) -> None:
    """Exit 2, one line naming the input, before any work; every input byte for byte intact."""
    monkeypatch.chdir(tmp_path)
    before = tree(workdir)
    r = run_cli("build", "IN/X.pt", "--out", out, "--no-bench", "--no-metrics", *extra, *(["--force"] if force else []))
    assert r.code == 2, (r.out, r.err)
    assert how in r.err and "which this command reads" in r.err and "Traceback" not in r.err, r.err
    assert len(r.err.splitlines()) == 2  # error + hint
    assert tree(workdir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IN", "link"]


def test_relative_dot_out_inside_the_input_dir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    before = tree(workdir)
    r = run_cli("build", "X.pt", "--out", ".", "--force", "--no-bench", "--no-metrics")
    assert r.code == 2 and "contains the checkpoint" in r.err, r.err
    assert tree(workdir) == before


def _legacy_bundle(tiny_bundle: Path, at: Path) -> Path:
    shutil.copytree(tiny_bundle, at)
    (at / MARKER).unlink()  # as a bundle written before the marker existed
    return at


def _fake_marker_link(tmp_path: Path, at: Path) -> Path:
    at.mkdir()
    (at / "precious.txt").write_text("x")
    (tmp_path / "elsewhere").write_text("{}")
    (at / MARKER).symlink_to(tmp_path / "elsewhere")
    return at


UNMARKED = {
    "user-dir": lambda tiny_bundle, tmp_path, at: (at.mkdir(), (at / "precious.txt").write_text("x"), at)[-1],
    "legacy-bundle": lambda tiny_bundle, tmp_path, at: _legacy_bundle(tiny_bundle, at),
    "marker-is-a-link": lambda tiny_bundle, tmp_path, at: _fake_marker_link(tmp_path, at),
}


@pytest.mark.parametrize("kind", UNMARKED)
def test_force_refuses_a_directory_mixexport_did_not_write(kind: str, tiny_ckpt: Path, tiny_bundle: Path,
                                                           tmp_path: Path) -> None:
    out = UNMARKED[kind](tiny_bundle, tmp_path, tmp_path / "out")
    before = tree(out)
    r = run_cli("build", str(tiny_ckpt), "--out", str(out), "--force", "--no-bench", "--no-metrics")
    assert r.code == 2 and "was not written by mixexport" in r.err and "Traceback" not in r.err, r.err
    assert tree(out) == before


def test_force_refuses_a_link_as_out(tiny_ckpt: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    marked = tmp_path / "marked"
    shutil.copytree(tiny_bundle, marked)
    (tmp_path / "out").symlink_to(marked)
    r = run_cli("build", str(tiny_ckpt), "--out", str(tmp_path / "out"), "--force", "--no-bench", "--no-metrics")
    assert r.code == 2 and "symbolic link" in r.err, r.err
    assert tree(marked) == tree(tiny_bundle)


def test_built_bundles_are_marked_and_force_takes_an_empty_dir(tiny_ckpt: Path, tiny_bundle: Path,
                                                               tmp_path: Path) -> None:
    """The marker is in every bundle, listed in its files like every other file (verify passes);
    an empty directory is replaced with --force."""
    assert (tiny_bundle / MARKER).is_file()
    assert MARKER in read_files(tiny_bundle)
    out = tmp_path / "empty"
    out.mkdir()
    r = run_cli("build", str(tiny_ckpt), "--out", str(out), "--force", "--no-bench", "--no-metrics")
    assert r.code == 0, r.err
    assert (out / MARKER).is_file()
    assert run_cli("verify", str(out), "--no-metrics").code == 0


def read_files(bundle: Path) -> dict[str, str]:
    from mixexport.bundle import read_manifest

    return read_manifest(bundle).data["files"]


def test_build_to_a_read_only_directory(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A read-only mount and an immutable directory (root ignores permission bits): exit 2, one line."""
    with tmpfs(tmp_path / "ro", 1024, read_only=True) as mnt:
        r = run_cli("build", str(tiny_ckpt), "--out", str(mnt / "b"), "--no-bench", "--no-metrics")
        assert r.code == 2 and "not writable" in r.err and "Traceback" not in r.err, r.err
        assert leftovers(mnt) == []
    imm = tmp_path / "immutable"
    imm.mkdir()
    if subprocess.run(["chattr", "+i", str(imm)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        r = run_cli("build", str(tiny_ckpt), "--out", str(imm / "b"), "--no-bench", "--no-metrics")
        assert r.code == 2 and "not writable" in r.err and "Traceback" not in r.err, r.err
    finally:
        subprocess.run(["chattr", "-i", str(imm)], check=True)
    assert os.listdir(imm) == []


@pytest.mark.parametrize("room", ["onnx-does-not-fit", "onnx-fits"])
def test_build_to_a_full_disk(room: str, tiny_ckpt: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """A real small tmpfs: the segment write fails, or a later file (reports, manifest) does. Exit 3,
    one line naming the file, nothing left on the disk (no temp dir, no bundle)."""
    onnx_kib = (tiny_bundle / "segments" / "model.onnx").stat().st_size // 1024 + 1
    free = 256 if room == "onnx-does-not-fit" else onnx_kib + 8
    with tmpfs(tmp_path / "disk", onnx_kib + 512, free_kib=free) as mnt:
        r = run_cli("build", str(tiny_ckpt), "--out", str(mnt / "b"), "--no-bench", "--no-metrics")
        assert r.code == 3, (r.out, r.err)
        assert "no space left writing" in r.err and "Traceback" not in r.err, r.err
        lines = [line for line in r.err.splitlines() if not line.startswith("·")]  # progress lines
        assert [line.split(":")[0] for line in lines] == ["error", "hint"], r.err
        assert leftovers(mnt) == []

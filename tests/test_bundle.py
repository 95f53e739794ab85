"""Bundle directory: manifest contents and validation, atomic writes, --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixexport.bundle import SCHEMA_VERSION, check_integrity, read_manifest
from mixexport.errors import BadInputError, GateFailedError
from mixexport.pipeline import BuildOptions, build


def test_manifest_is_the_single_source_of_truth(tiny_bundle: Path) -> None:
    m = read_manifest(tiny_bundle)
    d = m.data
    assert d["schema_version"] == SCHEMA_VERSION and d["target"] == "onnx"
    assert {"mixexport", "torch", "onnx", "onnxruntime"} <= set(d["versions"])
    assert d["model"]["family"] == "rankmixer" and d["model"]["params"] > 0
    assert len(d["model"]["source"]["sha256"]) == 64
    seg = m.segments[0]
    assert seg.role == "full" and seg.backend == "onnxruntime" and seg.file == "segments/model.onnx"
    assert [s.name for s in seg.inputs] == ["user_cat", "item_cat", "item_dense", "seq_items"]
    assert seg.inputs[0].vocab == (50, 8, 3, 22, 10) and seg.inputs[0].shape == ("batch", 5)
    assert seg.session_options["config"]["session.qdq_matmulnbits_accuracy_level"] == "0"
    assert d["parity"]["status"] == "PASS"
    check_integrity(m)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "newer than this mixexport supports"),
    (lambda d: d.pop("segments"), "missing 'segments'"),
    (lambda d: d.update(segments="x"), "segments must be list"),
    (lambda d: d["segments"][0].update(role="bogus"), "segments[0].role is 'bogus'"),
    (lambda d: d["segments"][0].pop("file"), "segments[0] is missing 'file'"),
])
def test_manifest_validation_messages(bundle_copy: Path, edit, message: str) -> None:
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(BadInputError) as e:
        read_manifest(bundle_copy)
    assert message in e.value.message


def test_integrity_names_changed_and_missing_files(bundle_copy: Path) -> None:
    (bundle_copy / "reports" / "report.md").write_text("tampered")
    (bundle_copy / "reports" / "parity.json").unlink()
    with pytest.raises(GateFailedError) as e:
        check_integrity(read_manifest(bundle_copy))
    assert "changed reports/report.md" in e.value.message and "missing reports/parity.json" in e.value.message


def test_failed_build_leaves_nothing(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    # zero tolerance: ONNX Runtime's float rounding differs from torch's, so parity fails
    with pytest.raises(GateFailedError) as e:
        build(tiny_ckpt, BuildOptions(out=out, bench=False, atol={"*": 0.0}, rtol={"*": 0.0}))
    assert "parity failed" in e.value.message and "FAIL logit" in e.value.message
    assert "elements outside" in e.value.message and "metric parity" not in e.value.message  # no labels
    assert list(tmp_path.iterdir()) == []


def test_failed_build_says_when_only_tensors_failed(ml_ckpt: Path, tmp_path: Path) -> None:
    # zero tolerance fails the tensors; the MovieLens metrics still pass, and the error says so
    with pytest.raises(GateFailedError) as e:
        build(ml_ckpt, BuildOptions(out=tmp_path / "b", bench=False, atol={"*": 0.0}, rtol={"*": 0.0}))
    assert "FAIL logit" in e.value.message
    assert "metric parity PASS on labelled data: ΔAUC" in e.value.message and "Kendall tau" in e.value.message
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_after_the_new_bundle_is_complete(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    build(tiny_ckpt, BuildOptions(out=out, bench=False))
    first = read_manifest(out).data["created"]
    (out / "marker").write_text("old bundle")
    # a failing --force build keeps the old bundle untouched
    with pytest.raises(GateFailedError):
        build(tiny_ckpt, BuildOptions(out=out, force=True, bench=False, atol={"*": 0.0}, rtol={"*": 0.0}))
    assert (out / "marker").exists() and read_manifest(out).data["created"] == first
    build(tiny_ckpt, BuildOptions(out=out, force=True, bench=False))
    assert not (out / "marker").exists()
    check_integrity(read_manifest(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _build_cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-c", "from mixexport.cli import main; main()", "build", str(ckpt), "--out", str(out),
            "--no-bench", *extra]


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_build_leaves_no_bundle_and_stale_temp_is_cleaned(tiny_ckpt: Path, tmp_path: Path, sig: str) -> None:
    import signal
    import subprocess
    import time

    out = tmp_path / "b"
    proc = subprocess.Popen(_build_cmd(tiny_ckpt, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".b.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # kill once the temp dir exists: the bundle is being written
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == "SIGTERM":  # handled like Ctrl-C: the temp dir is removed at once
        assert proc.returncode == 130 and "interrupted; nothing was written" in err
        assert list(tmp_path.iterdir()) == []
    else:  # nothing can run on SIGKILL: the next build of the same --out removes the dead temp dir
        assert list(tmp_path.glob(".b.tmp-*"))
        build(tiny_ckpt, BuildOptions(out=out, bench=False))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_interrupted_force_swap_restores_the_previous_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from mixexport.bundle import recover_stale

    out = tmp_path / "b"
    dead_pid = 2**22 + 12345  # above the kernel's default pid_max: never a live process
    shutil.copytree(tiny_bundle, tmp_path / f".b.old-{dead_pid}-1")  # moved aside, new one never renamed in
    assert recover_stale(out) == [f"restored {out} from .b.old-{dead_pid}-1"]
    check_integrity(read_manifest(out))

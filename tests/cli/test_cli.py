"""The real CLI end to end: build → verify → bench → inspect → passes, exit codes and messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli


@pytest.fixture(scope="module")
def ml_bundle(ml_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "rm"
    r = run_cli("build", str(ml_ckpt), "--out", str(out), "--candidates", "1,16", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["parity"]["status"] == "PASS" and data["out"] == str(out)
    return out


def test_verify_json_reports_tensor_and_metric_parity(ml_bundle: Path) -> None:
    r = run_cli("verify", str(ml_bundle), "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["status"] == "PASS" and rep["backend"] == "onnxruntime"
    assert rep["max_rel"] <= 1e-4
    m = rep["metrics"]
    assert m["dataset"] == "movielens-100k test split" and m["rows"] > 19_000
    assert abs(m["auc"]["delta"]) <= 1e-4 and m["status"] == "PASS"
    assert 0.55 < m["auc"]["reference"] < 0.9
    requests = {t["request"] for t in rep["tensor"]}
    assert {"sample", "1user x 1", "3user x 256"} <= requests
    for t in rep["tensor"]:
        for o in t["outputs"]:
            assert {"max_abs", "mean_abs", "max_rel", "cosine", "min_atol", "min_rtol", "passed"} <= set(o)


def test_bench_json_reports_eager_and_bundle_p50_per_n(ml_bundle: Path) -> None:
    r = run_cli("bench", str(ml_bundle), "--json", "--candidates", "1,16,64", "--budget", "0")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert set(rep["runners"]) == {"eager", "bundle (onnxruntime)"}
    for runner in rep["runners"].values():
        assert set(runner) == {"1", "16", "64"}
        for n in runner.values():
            assert n["p50_ms"] > 0 and n["p99_ms"] >= n["p50_ms"] and n["runs"] >= 5


def test_bench_peers_time_every_peer_and_leave_no_files(ml_bundle: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--peers``: torch.compile, AOTInductor, stock ORT fp32 and stock quantize_dynamic are timed in
    the same run as the bundle; their compiled / exported files are gone once they are loaded."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = run_cli("bench", str(ml_bundle), "--json", "--candidates", "4", "--budget", "0",
                "--peers", "compile,aoti,ort-default,ort-quantize-dynamic")
    assert r.code == 0, r.err
    runners = json.loads(r.out)["runners"]
    assert set(runners) == {"eager", "bundle (onnxruntime)", "torch.compile", "aoti", "ort-default",
                            "ort-quantize-dynamic"}
    assert all(v["4"]["p50_ms"] > 0 for v in runners.values())
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("mixexport-")]


def test_build_writes_reports_and_plot(ml_bundle: Path) -> None:
    for rel in ("reports/parity.json", "reports/latency.json", "reports/report.md", "reports/latency.png",
                "inputs/sample.npz", "segments/model.onnx"):
        assert (ml_bundle / rel).is_file(), rel
    assert (ml_bundle / "reports/latency.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((ml_bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.relative_to(ml_bundle).as_posix() for p in ml_bundle.rglob("*")
                                      if p.is_file() and p.name != "manifest.json"}
    ledger = json.loads((ml_bundle / "reports/parity.json").read_text())["ledger"]
    assert [row["stage"] for row in ledger] == ["torch.export", "onnx export"]


def test_inspect_and_passes(ml_ckpt: Path, ml_bundle: Path) -> None:
    r = run_cli("inspect", str(ml_ckpt), "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["family"] == "rankmixer" and {i["role"] for i in info["inputs"]} == {"user", "item", "sequence"}
    r = run_cli("inspect", str(ml_bundle))
    assert r.code == 0 and "segment model (full, onnxruntime)" in r.out
    r = run_cli("passes", "--json")
    assert r.code == 0 and isinstance(json.loads(r.out), list)


@pytest.mark.parametrize("args,code,message", [
    (["build", "/nonexistent.pt"], 2, "does not exist"),
    (["build", "{ckpt}", "--target", "nosuch"], 2, "unknown --target 'nosuch'"),
    (["build", "{ckpt}", "--passes", "nosuch"], 2, "unknown pass 'nosuch'; known passes:"),
    (["build", "{ckpt}", "--atol", "x:"], 2, "expected NAME:VALUE"),
    (["build", "{ckpt}", "--device", "cuda"], 3, "CUDA"),
    (["build", "{ckpt}", "--out", "/proc/nope/x"], 2, "parent directory /proc/nope does not exist"),
    (["verify", "/nonexistent"], 2, "is not a bundle directory"),
    (["bench", "{ckpt}"], 2, "is not a bundle directory"),
    (["build", "{ckpt}", "--bogus"], 2, "No such option"),
    (["build", "{ckpt}", "--precision", "int8", "--target", "aoti"], 2,
     "--precision int8 builds integer GEMMs for ONNX Runtime on CPU; found --target aoti --device cpu"),
])
def test_errors_are_one_line_with_exit_codes(tiny_ckpt: Path, tmp_path: Path, args: list[str], code: int,
                                             message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = run_cli(*[a.format(ckpt=tiny_ckpt) for a in args])
    assert r.code == code, (r.out, r.err)
    assert message in r.err
    assert "Traceback" not in r.err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_existing_out_needs_force(tiny_bundle: Path, tiny_ckpt: Path) -> None:
    before = (tiny_bundle / "manifest.json").read_text()
    r = run_cli("build", str(tiny_ckpt), "--out", str(tiny_bundle), "--no-bench")
    assert r.code == 2 and "already exists" in r.err and "--force" in r.err
    assert (tiny_bundle / "manifest.json").read_text() == before


def test_tampered_bundle_fails_verify_with_exit_1(bundle_copy: Path) -> None:
    seg = bundle_copy / "segments" / "model.onnx"
    seg.write_bytes(seg.read_bytes() + b"\0")
    (bundle_copy / "inputs" / "sample.npz").unlink()
    r = run_cli("verify", str(bundle_copy))
    assert r.code == 1
    assert "changed segments/model.onnx" in r.err and "missing inputs/sample.npz" in r.err


def test_pass_that_does_not_apply_and_bad_out(tiny_ckpt: Path, tmp_path: Path) -> None:
    r = run_cli("build", str(tiny_ckpt), "--passes", "split-user-item", "--out", str(tmp_path / "b"), "--no-bench")
    assert r.code == 2 and "needs user-only computation past the embeddings" in r.err and "Traceback" not in r.err
    afile = tmp_path / "file"
    afile.write_text("x")
    r = run_cli("build", str(tiny_ckpt), "--out", str(afile / "b"), "--no-bench")
    assert r.code == 2 and "is a file, not a directory" in r.err
    r = run_cli("build", str(tiny_ckpt), "--option", "nonsense", "--out", str(tmp_path / "c"))
    assert r.code == 2 and "expected PASS.FIELD=VALUE" in r.err
    r = run_cli("build", str(tiny_ckpt), "--dump-after", "nosuch", "--out", str(tmp_path / "d"))
    assert r.code == 2 and "--dump-after 'nosuch': not a pass of this build" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

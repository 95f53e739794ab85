"""``scripts/gpu_check.py`` in its CPU dry-run mode (tiny rankmixer): the real builds, runners, FLOP
count and JSON report the H100 run produces — everything except the GPU itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mixexport.verification.compare import DEFAULT_TOLERANCES

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def rankmixer_tiny_flops_per_row() -> int:
    """Matmul FLOPs of one row of rankmixer.tiny(), by hand (2 per multiply-add)."""
    from mixexport.models import rankmixer

    c = rankmixer.tiny()
    s = c.schema
    width = (len(s.user_vocab) + 1 + len(s.item_vocab) + 1) * c.emb_dim
    chunk = math.ceil(width / c.tokens)
    dense = 2 * s.item_dense * c.emb_dim                                   # item_dense projection
    tokenizer = 2 * c.tokens * chunk * c.dim
    ffn = c.layers * 2 * c.tokens * 2 * c.dim * c.ffn_mult * c.dim          # W1 and W2 per token
    towers = c.tasks * (2 * c.dim * (c.dim // 2) + 2 * (c.dim // 2))
    return dense + tokenizer + ffn + towers


def test_cpu_dry_run_report(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--families", "rankmixer",
                        "--batches", "4", "--budget", "0.02", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["machine"]["device"] == "cpu" and report["peak_tflops"] is None
    fam = report["families"]["rankmixer"]
    assert "errors" not in fam, fam.get("errors")
    assert fam["flops_per_row"] == rankmixer_tiny_flops_per_row()
    assert fam["aoti"]["parity"] == "PASS" and fam["aoti"]["precision"] == "bf16"
    assert fam["ort"]["parity"] == "PASS" and fam["ort"]["precision"] == "fp16"
    row = fam["latency"]["4"]
    assert set(row) == {"eager bf16", "torch.compile bf16", "aoti bf16", "onnxruntime fp16"}
    for label, stats in row.items():
        precision = label.rsplit(" ", 1)[1]
        assert stats["p50_ms"] > 0 and stats["mfu"] is None, label
        assert 0 < stats["max_rel_vs_fp32"] <= DEFAULT_TOLERANCES[precision][0] * 2, label  # cast, but close
    assert fam["trt_rtx"].get("skipped", "").startswith("TensorRT-RTX") or "version" in fam["trt_rtx"]
    assert "rankmixer B=4: eager bf16" in r.stdout


def test_cuda_without_gpu_exits_3(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 3
    assert "no CUDA GPU" in r.stderr and not (tmp_path / "gpu_check.json").exists()

"""The MovieLens trainer example, run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mixexport.models import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_train_example_prints_test_auc_and_writes_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "rm.pt"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_movielens.py"), "--family", "rankmixer",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^test AUC (\d\.\d+), test logloss (\d\.\d+) .*wrote", r.stdout, re.M)
    assert m, r.stdout
    assert float(m.group(1)) > 0.65  # MovieLens rating>=4 with ids, demographics and history
    ck = load_checkpoint(out)
    assert ck.metadata["dataset"] == "movielens-100k"
    assert abs(ck.metadata["test_auc"] - float(m.group(1))) < 1e-4


def test_train_example_unknown_family_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_movielens.py"), "--family", "nosuch",
                        "--out", str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and not (tmp_path / "x.pt").exists()

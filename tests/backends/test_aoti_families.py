"""``--target aoti`` for every family (slow: one AOTInductor compile per segment, minutes each on
two cores): the tiny random-init model with its default passes builds, verifies and scores several
users × candidates like eager. The CI slice compiles rankmixer only (test_aoti.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mixexport.models import FAMILIES, save_checkpoint
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.verification.compare import compare_outputs, resolve_tolerances
from tests.cli_helpers import MIXEXPORT



@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_and_verifies_for_aoti(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    mod = FAMILIES[family]
    ckpt = save_checkpoint(mod.Model(mod.tiny()).eval(), tmp_path / f"{family}.pt", {"note": "random init"})
    out = tmp_path / "b"
    r = subprocess.run([MIXEXPORT, "build", str(ckpt), "--target", "aoti", "--no-bench", "--no-metrics",
                        "--out", str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["backend"] for s in manifest["segments"]} == {"aoti"}
    assert json.loads(r.stdout)["parity"]["status"] == "PASS"
    source = load_source(ckpt)
    request = source.example_request(3, 9, seed=4)
    with Runtime.open(out) as rt, Runtime.reference(source) as ref:
        res = compare_outputs(rt.score(request), ref.score(request),
                              *resolve_tolerances([o.name for o in source.outputs], "fp32", {}, {}))
    assert all(x.passed for x in res), [x.line() for x in res]

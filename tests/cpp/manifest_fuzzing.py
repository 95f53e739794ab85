"""One manifest-fuzz loop for both C++ scorers (ONNX Runtime and AOTI)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

from mixexport.testing.manifest_fuzz import mutate

FUZZ_MUTATIONS = 40


def assert_survives_manifest_fuzzing(exe: Path, bundle: Path, request: Path, seed: str,
                                     refusals: tuple[int, ...]) -> None:
    """Random structural mutations (mixexport.testing.manifest_fuzz) of ``bundle``'s manifest, each
    scored by ``exe``: scores, or exactly one ``error:`` line with an exit code in ``refusals`` —
    never a crash, a hang or a partial answer; most mutations are refused."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    outcomes = {"refused": 0, "accepted": 0}
    for k in range(FUZZ_MUTATIONS):
        kind, where, text = mutate(manifest, random.Random(f"{seed}/{k}"))
        path.write_text(text)
        r = subprocess.run([str(exe), str(bundle), str(request)], capture_output=True, text=True,
                           errors="replace", timeout=120)
        label = f"mutation {k} ({kind}: {where[:80]})"
        assert r.returncode in (0, *refusals), (label, r.returncode, r.stderr[-500:])
        if r.returncode:
            assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and r.stdout == "", \
                (label, r.stderr[-500:])
        outcomes["refused" if r.returncode else "accepted"] += 1
    assert outcomes["refused"] > FUZZ_MUTATIONS // 2, outcomes

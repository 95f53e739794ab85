"""``examples/cpp``'s ONNX Runtime scorer on a user's program whose ``forward`` returns a nested dict:
it prints every output under the manifest's name (``ctr``, ``aux.cvr``, ``aux.parts.0``…) with the
Python runtime's values (issue 27, item 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mixexport.runtime import Runtime
from mixexport.specs import Request
from tests.cli_helpers import run_cli
from tests.program.test_shapes import BATCH, EXPECTED, MultiTask, ids, save

from .conftest import CppBuild
from .test_cpp_example import parse_outputs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "cpp"))
from make_request import write_request  # noqa: E402  (the example's own helper, not a package)


def test_dict_outputs_keep_their_names_in_cpp(cpp_build: CppBuild, tmp_path: Path) -> None:
    scorer = cpp_build.dir / "mixexport_score_ort"
    assert scorer.is_file(), cpp_build.log[-2000:]
    torch.manual_seed(0)
    pt2 = save(tmp_path / "ple.pt2", MultiTask(), (ids(4, 20), ids(4, 30)), {"user_id": {0: BATCH}, "item_id": {0: BATCH}})
    bundle = tmp_path / "ple"
    r = run_cli("build", str(pt2), "--out", str(bundle), "--no-bench")
    assert r.code == 0, r.err
    write_request(bundle, tmp_path / "req")
    run = subprocess.run([str(scorer), str(bundle), str(tmp_path / "req")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = parse_outputs(run.stdout)
    sample = Request.from_npz_dict(dict(np.load(bundle / "inputs" / "sample.npz")))
    with Runtime.open(bundle) as rt:
        want = rt.score(sample)
    assert list(got) == EXPECTED == list(want)
    for name in EXPECTED:
        assert got[name].shape == want[name].shape, name
        assert np.abs(got[name] - want[name]).max() <= 1e-5, name


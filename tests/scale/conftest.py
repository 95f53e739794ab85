"""Fixtures of the data-set scale tests: a split bundle (user segment + item segment), Parquet data
for it, and one Ray for the session (2 CPUs, local). CI sets MIXEXPORT_REQUIRE_RAY=1: there a
missing Ray fails the Ray tests instead of skipping them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mixexport.models import FAMILIES, save_checkpoint


@pytest.fixture(scope="session")
def split_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny UG-Sep bundle: its default passes split it into user and item segments."""
    from mixexport.pipeline import BuildOptions, build

    root = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    mod = FAMILIES["ugsep"]
    ckpt = save_checkpoint(mod.Model(mod.tiny()).eval(), root / "ug.pt", {})
    build(ckpt, BuildOptions(out=root / "ug", bench=False, metrics=False))
    return root / "ug"


@pytest.fixture(scope="session")
def eval_rows(split_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 1,500 rows as one file and as three files (split at user boundaries)."""
    from mixexport.scale.synth import write_eval_parquet

    root = tmp_path_factory.mktemp("eval")
    write_eval_parquet(split_bundle, root / "one", rows=1500, files=1, seed=3)
    write_eval_parquet(split_bundle, root / "three", rows=1500, files=3, seed=3)
    return {"one": root / "one", "three": root / "three"}


@pytest.fixture(scope="session")
def local_report(split_bundle: Path, eval_rows: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """``mixexport verify --report`` on the one-file copy with the local engine: the report's text."""
    from tests.cli_helpers import run_cli

    path = tmp_path_factory.mktemp("report") / "one.json"
    res = run_cli("verify", str(split_bundle), "--data", f"{eval_rows['one']}/*.parquet", "--report", str(path))
    assert res.code == 0, res.err
    assert "PASS" in res.out and "1500 rows in 1 files" in res.out
    return path.read_text()


@pytest.fixture(scope="session")
def ray_local():
    """Ray in local mode with 2 CPUs, started once, shut down at the end of the session."""
    try:
        import ray
    except ImportError:
        if os.environ.get("MIXEXPORT_REQUIRE_RAY") == "1":
            pytest.fail("MIXEXPORT_REQUIRE_RAY=1 but ray is not installed (pip install 'mixexport[ray]')")
        pytest.skip("ray is not installed (pip install 'mixexport[ray]')")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()

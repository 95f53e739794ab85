"""Shared fixtures: tiny checkpoints and bundles built once per session (real torch.export, real
ONNX Runtime, real files). Each test that needs to mutate a bundle copies it first."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mixexport.models import FAMILIES, save_checkpoint


def make_checkpoint(path: Path, family: str = "rankmixer", config=None, seed: int = 0,
                    metadata: dict | None = None) -> Path:
    torch.manual_seed(seed)
    mod = FAMILIES[family]
    model = mod.Model(config or mod.tiny())
    return save_checkpoint(model.eval(), path, metadata or {})


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny rankmixer on the synthetic schema (no dataset metadata)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "rankmixer.pt")


@pytest.fixture(scope="session")
def ml_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny rankmixer briefly trained on MovieLens-100k (metadata names the dataset)."""
    from mixexport.data import movielens_100k
    from mixexport.models import rankmixer
    from mixexport.training import train

    data = movielens_100k(seq_len=32)
    torch.manual_seed(0)
    model = rankmixer.Model(rankmixer.tiny(data.schema))
    result = train(model, data, epochs=1, max_steps=40, log=lambda _m: None)
    return save_checkpoint(model, tmp_path_factory.mktemp("ml") / "rm-ml.pt",
                           {"dataset": data.name, "test_auc": result["test_auc"]})


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixexport.pipeline import BuildOptions, build

    out = tmp_path_factory.mktemp("bundles") / "rm"
    build(tiny_ckpt, BuildOptions(out=out, bench_candidates=(1, 16), bench_budget_s=0.05))
    return out


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may modify."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst

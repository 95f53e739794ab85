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


def assert_training_reduces_loss(model: torch.nn.Module, feeds: dict, steps: int = 25) -> None:
    """A few Adam steps on a label learnable from the item id cut the family's training loss."""
    label = (feeds["item_cat"][:, 0] % 2).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.training_loss(feeds, label)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def assert_bundle_matches_eager(bundle: Path, ckpt: Path, users: int, candidates: int, max_rel: float = 1e-5) -> None:
    """U users x N candidates (seeded by the shape) score like the eager model on repeated user rows."""
    import numpy as np

    from mixexport.runtime import Runtime
    from mixexport.source import load_source

    source = load_source(ckpt)
    req = source.example_request(users, candidates, seed=users * 1000 + candidates)
    with Runtime.open(bundle) as rt, Runtime.reference(source) as ref:
        got, want = rt.score(req)["logit"], ref.score(req)["logit"]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= max_rel

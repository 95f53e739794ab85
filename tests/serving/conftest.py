"""The bundles the Triton tests serve: a UG-Sep split (user + item segments) and a LONGER KV bundle
(cache + user + item, an appendable per-user KV cache), each built once per session from a tiny
random-init checkpoint (real torch.export, ONNX Runtime and verify). Both test modules carry the
xdist group ``triton`` so that one worker builds them once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_checkpoint


def _build(root: Path, family: str) -> tuple[Path, Path]:
    from mixexport.pipeline import BuildOptions, build

    ckpt = make_checkpoint(root / f"{family}.pt", family=family)
    build(ckpt, BuildOptions(out=root / family, bench=False, metrics=False))
    return ckpt, root / family


@pytest.fixture(scope="session")
def ugsep_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, bundle) of a tiny UG-Sep model built with split-user-item (its default)."""
    return _build(tmp_path_factory.mktemp("triton-ug"), "ugsep")


@pytest.fixture(scope="session")
def longer_kv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, bundle) of a tiny LONGER model built with extract-kv-cache (its default)."""
    return _build(tmp_path_factory.mktemp("triton-lo"), "longer")

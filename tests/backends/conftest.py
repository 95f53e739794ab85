"""Fixtures for backend tests: one tiny AOTI bundle (a real AOTInductor compile, tens of seconds)
built once per test session and shared with ``tests/cpp`` through :func:`aoti_bundle_for`."""

from __future__ import annotations

from pathlib import Path

import pytest

_BUILT: dict[tuple[Path, str], Path] = {}


def aoti_bundle_for(ckpt: Path, root: Path, precision: str = "fp32") -> Path:
    """Build (once per checkpoint and precision in this process) an AOTI CPU bundle of ``ckpt``."""
    from mixexport.pipeline import BuildOptions, build

    key = (ckpt, precision)
    if key not in _BUILT:
        out = root / f"aoti-{precision}-{ckpt.stem}"
        build(ckpt, BuildOptions(out=out, target="aoti", precision=precision, bench=False))
        _BUILT[key] = out
    return _BUILT[key]


@pytest.fixture(scope="session")
def aoti_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny rankmixer built with ``--target aoti`` on CPU (fp32). Tests must not modify it."""
    return aoti_bundle_for(tiny_ckpt, tmp_path_factory.mktemp("aoti"))

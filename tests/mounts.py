"""Real small file systems for the write-failure tests: a tmpfs of a few MiB (a disk that fills up)
and a read-only one. Mounting needs root (CAP_SYS_ADMIN); where that is not permitted the tests skip
with the reason. Root ignores file permissions, so a read-only directory is a read-only mount, not
a chmod."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


@contextmanager
def tmpfs(where: Path, size_kib: int, free_kib: int | None = None, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` at ``where`` (created), optionally filled by a file ``filler`` until
    about ``free_kib`` are left, optionally remounted read-only; unmounted on exit."""
    where.mkdir(parents=True, exist_ok=True)
    r = _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(where))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip() or 'mount failed'}): "
                    "the full-disk and read-only tests need root in a container that permits mount")
    try:
        if free_kib is not None:
            with open(where / "filler", "wb") as f:
                f.write(b"\0" * max(0, (size_kib - free_kib) * 1024))
        if read_only:
            r = _run("mount", "-o", "remount,ro", str(where))
            assert r.returncode == 0, r.stderr
        yield where
    finally:
        r = _run("umount", str(where))
        assert r.returncode == 0, r.stderr


def leftovers(where: Path) -> list[str]:
    """What is in ``where`` besides the filler (temporary siblings included: they start with '.')."""
    return sorted(p.name for p in where.iterdir() if p.name != "filler")

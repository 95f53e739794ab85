"""The backend protocol (after Polygraphy's runners): every backend has a ``name``, says why it is
unavailable here (or None), and prepares a :class:`Session` for one segment of a bundle. Heavy
imports (TensorRT, torch CUDA) happen inside ``prepare``/``compile``, never at module import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from mixexport.bundle import Bundle, BundleWriter, Manifest, SegmentEntry


class Session(Protocol):
    """A loaded segment: ``run`` maps input arrays by name to output arrays by name; ``close``
    releases what it holds (native sessions, engines, contexts, streams)."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Session: ...

    def __exit__(self, *exc: object) -> None: ...


class Backend(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when this backend can run here; otherwise a one-line reason with the fix."""

    def session_options(self) -> dict[str, Any]:
        """Options recorded per segment in the manifest and used by every session of it."""

    def compile(self, bundle: Bundle, writer: BundleWriter, progress: Any) -> dict[str, dict[str, str]]:
        """Build-time artifacts beyond the ONNX segments (engines, AOTI packages): written with
        ``writer.path("engines/...")``; returns {segment name: {backend name: relative path}}."""

    def prepare(self, manifest: Manifest, segment: SegmentEntry, workdir: Path | None = None) -> Session:
        """Load ``segment`` of the bundle for inference."""

    def describe(self) -> dict[str, Any]:
        """Versions and options, for reports."""


class SessionBase:
    """Context-manager plumbing shared by sessions: leaving ``with`` calls :meth:`close`.

    Every session releases what it holds in ``close`` — it does not wait for garbage collection,
    since ``verify`` and ``bench`` open several runtimes in one process — and ``close`` may be
    called more than once. After it, ``run`` raises :class:`RuntimeError`.
    """

    closed = False

    def __enter__(self) -> SessionBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the session's handles (subclasses drop theirs, then call this)."""
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

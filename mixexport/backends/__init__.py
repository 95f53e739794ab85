"""Backends, in one explicit table. ``eager`` (the reference) lives in :mod:`.eager` and runs the
original model; the others run the bundle's segments."""

from __future__ import annotations

from mixexport.backends.onnxruntime import OnnxRuntimeBackend
from mixexport.errors import BadInputError, EnvironmentUnavailableError

BACKENDS = {"onnxruntime": OnnxRuntimeBackend}


def get_backend(name: str, device: str = "cpu", require: bool = True):  # noqa: ANN201 - a Backend
    """The backend ``name`` on ``device``; with ``require``, raise (exit 3) if it cannot run here."""
    try:
        backend = BACKENDS[name](device=device)
    except KeyError:
        raise BadInputError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}", "pick a known backend") from None
    reason = backend.unavailable_reason() if require else None
    if reason:
        raise EnvironmentUnavailableError(reason)
    return backend

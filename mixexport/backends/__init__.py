"""Backends, in one explicit table. ``eager`` (the reference) lives in :mod:`.eager` and runs the
original model; the others run the bundle's segments."""

from __future__ import annotations

from typing import Any, Mapping

from mixexport.backends.aoti import AotiBackend
from mixexport.backends.onnxruntime import OnnxRuntimeBackend
from mixexport.backends.openvino import OpenVinoBackend
from mixexport.backends.tensorrt import TensorRTBackend, TensorRTRtxBackend
from mixexport.errors import BadInputError, EnvironmentUnavailableError

BACKENDS = {"onnxruntime": OnnxRuntimeBackend, "aoti": AotiBackend, "tensorrt": TensorRTBackend,
            "tensorrt-rtx": TensorRTRtxBackend, "openvino": OpenVinoBackend}


def get_backend(name: str, device: str = "cpu", require: bool = True,
                settings: Mapping[str, Any] | None = None, for_build: bool = False):  # noqa: ANN201 - a Backend
    """The backend ``name`` on ``device``; with ``require``, raise (exit 3) if it cannot run here
    (``for_build``: if it cannot *build* here — TensorRT-RTX builds engines without a GPU).

    ``settings`` are build options by field name (``shapes``, ``version_compatible``); a backend
    takes those listed in its ``BUILD_SETTINGS``, and a set (truthy) one it does not take is a usage
    error, so ``--shapes`` on ``--target onnx`` is refused instead of silently ignored.
    """
    if name not in BACKENDS:
        raise BadInputError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}", "pick a known backend")
    cls = BACKENDS[name]
    accepted = getattr(cls, "BUILD_SETTINGS", ())
    given = {k: v for k, v in (settings or {}).items() if v}
    refused = sorted(set(given) - set(accepted))
    if refused:
        raise BadInputError(f"{', '.join('--' + k.replace('_', '-') for k in refused)} does not apply to "
                            f"backend {name}", "drop the option, or pick a target that uses it")
    backend = cls(device=device, **given)
    check = getattr(backend, "build_unavailable_reason", None) if for_build else None
    reason = (check or backend.unavailable_reason)() if require else None
    if reason:
        raise EnvironmentUnavailableError(reason)
    return backend

"""TensorRT-RTX in the tests: it builds engines without a GPU, so CI installs it (``.[trt-rtx]``)
and sets ``MIXEXPORT_REQUIRE_TRT_RTX=1``: there a missing TensorRT-RTX fails the engine tests instead
of skipping them. Elsewhere (a developer machine without the extra) they skip with the reason."""

from __future__ import annotations

import os

import pytest


def trt_rtx_reason() -> str | None:
    """None when TensorRT-RTX can build engines here, else why not."""
    from mixexport.backends.tensorrt import TensorRTRtxBackend

    return TensorRTRtxBackend().build_unavailable_reason()


def require_trt_rtx() -> None:
    reason = trt_rtx_reason()
    if reason is None:
        return
    if os.environ.get("MIXEXPORT_REQUIRE_TRT_RTX") == "1":
        pytest.fail(f"MIXEXPORT_REQUIRE_TRT_RTX=1 but {reason}")
    pytest.skip(reason)

"""Triton in the tests: CI installs ``.[triton]`` (pytriton's tritonserver, tritonclient) and sets
``MIXEXPORT_REQUIRE_TRITON=1``, so there a missing server or client fails the tests instead of
skipping them. Elsewhere they skip with the reason."""

from __future__ import annotations

import importlib.util
import os

import pytest


def triton_reason(server: bool = True) -> str | None:
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed (pip install -e '.[triton]')"
    if server:
        from mixexport.serving.triton_server import unavailable_reason

        return unavailable_reason()
    return None


def require_triton(server: bool = True) -> None:
    reason = triton_reason(server)
    if reason is None:
        return
    if os.environ.get("MIXEXPORT_REQUIRE_TRITON") == "1":
        pytest.fail(f"MIXEXPORT_REQUIRE_TRITON=1 but {reason}")
    pytest.skip(reason)

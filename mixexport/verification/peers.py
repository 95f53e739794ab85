"""Peer runners for ``bench --peers``: the same model run by other tools in the same run, so a
latency claim always stands next to what torch.compile, AOTInductor and stock ONNX Runtime do.

- ``compile``: ``torch.compile`` (inductor) of the eager model;
- ``aoti``: an AOTInductor package of the ``torch.export`` program, compiled here;
- ``ort-default``: the bundle's ONNX with ONNX Runtime's default session options.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixexport.bundle import Manifest
from mixexport.errors import BadInputError
from mixexport.source import Source, export_program
from mixexport.specs import Request

PEERS = ("compile", "aoti", "ort-default")


def _torch_runner(fn: Callable[..., Any], source: Source) -> Callable[[Request], Any]:
    import torch

    def run(req: Request) -> Any:
        with torch.inference_mode():
            return fn(**{k: torch.from_numpy(v) for k, v in req.rows().items()})

    return run


def make_peers(names: tuple[str, ...] | list[str], source: Source, manifest: Manifest,
               say: Callable[[str], None]) -> dict[str, Callable[[Request], Any]]:
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise BadInputError(f"unknown peers {unknown}; known: {', '.join(PEERS)}", "e.g. --peers compile,aoti")
    out: dict[str, Callable[[Request], Any]] = {}
    if "compile" in names:
        import torch

        say("peer: torch.compile")
        out["torch.compile"] = _torch_runner(torch.compile(source.module, dynamic=True), source)
    if "aoti" in names:
        import torch

        say("peer: AOTInductor compile (may take minutes)")
        program = export_program(source)
        pkg = Path(tempfile.mkdtemp(prefix="mixexport-aoti-")) / "model.pt2"
        torch._inductor.aoti_compile_and_package(program, package_path=str(pkg))
        out["aoti"] = _torch_runner(torch._inductor.aoti_load_package(str(pkg)), source)
    if "ort-default" in names:
        import onnxruntime as ort

        full = [s for s in manifest.segments if s.role == "full"]
        if not full:
            raise BadInputError("peer ort-default needs a bundle with one full segment", "drop it for split bundles")
        sess = ort.InferenceSession(str(manifest.file(full[0].file)), providers=["CPUExecutionProvider"])

        def run_ort(req: Request) -> list[np.ndarray]:
            return sess.run(None, req.rows())

        out["ort-default"] = run_ort
    return out

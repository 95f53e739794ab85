"""Peer runners for ``bench --peers``: the same model run by other tools in the same run, so a
latency claim always stands next to what torch.compile, AOTInductor and stock ONNX Runtime do.

- ``compile``: ``torch.compile`` (inductor) of the eager model;
- ``aoti``: an AOTInductor package of the ``torch.export`` program, compiled here;
- ``ort-default``: stock ONNX Runtime: the model's plain ONNX export (``torch.export`` → ONNX, fp32,
  no passes, one segment) with ONNX Runtime's default session options;
- ``ort-quantize-dynamic``: that ONNX through ``onnxruntime.quantization.quantize_dynamic`` with the
  settings that run on mixer models (``per_channel=False``, int8 weights; ``per_channel=True`` fails
  at run time on per-token ``[T,D,H]`` weights: "MatMulInteger : b zero point is not valid"), on
  ONNX Runtime's defaults — what a user reaching for int8 on CPU gets today.

The ONNX peers are exported here from the eager model, never taken from the bundle, so they are the
same whatever passes or precision the bundle has (split, KV, int8 bundles included).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixexport.errors import BadInputError
from mixexport.source import Source, export_program
from mixexport.specs import Request

PEERS = ("compile", "aoti", "ort-default", "ort-quantize-dynamic")


def _torch_runner(fn: Callable[..., Any], source: Source) -> Callable[[Request], Any]:
    import torch

    def run(req: Request) -> Any:
        with torch.inference_mode():
            return fn(**{k: torch.from_numpy(v) for k, v in req.rows().items()})

    return run


def make_peers(names: tuple[str, ...] | list[str], source: Source,
               say: Callable[[str], None]) -> dict[str, Callable[[Request], Any]]:
    """Runners of the named peers; their compiled or exported files are loaded into memory and the
    temporary directories removed before this returns."""
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
        with tempfile.TemporaryDirectory(prefix="mixexport-aoti-") as tmp:
            pkg = Path(tmp) / "model.pt2"
            torch._inductor.aoti_compile_and_package(program, package_path=str(pkg))
            out["aoti"] = _torch_runner(torch._inductor.aoti_load_package(str(pkg)), source)
    onnx_peers = [n for n in ("ort-default", "ort-quantize-dynamic") if n in names]
    if onnx_peers:
        say("peer: plain ONNX export (fp32, no passes)")
        with tempfile.TemporaryDirectory(prefix="mixexport-ort-") as tmp:
            plain = plain_onnx(source, Path(tmp) / "model.onnx")
            if "ort-default" in names:
                out["ort-default"] = _ort_runner(plain)
            if "ort-quantize-dynamic" in names:
                say("peer: onnxruntime.quantization.quantize_dynamic (per_channel=False)")
                out["ort-quantize-dynamic"] = _ort_runner(quantize_dynamic_model(plain, Path(tmp) / "model.qdq.onnx"))
    return out


def plain_onnx(source: Source, path: Path) -> Path:
    """The model's ONNX as exported with no passes (fp32, one segment), saved at ``path``."""
    from mixexport.export import save_onnx, to_onnx

    request = source.example_request(2, 16, seed=0)
    save_onnx(to_onnx(export_program(source), source.inputs, source.outputs, request.rows()), path)
    return path


def quantize_dynamic_model(model: Path, path: Path, per_channel: bool = False) -> Path:
    """``onnxruntime.quantization.quantize_dynamic`` of ``model`` (int8 weights), saved at ``path``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(path), per_channel=per_channel, weight_type=QuantType.QInt8)
    return path


def _ort_runner(path: Path) -> Callable[[Request], Any]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(req: Request) -> list[np.ndarray]:
        return sess.run(None, req.rows())

    return run

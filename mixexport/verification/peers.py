"""Peer runners for ``bench --peers``: the same model run by other tools in the same run, so a
latency claim always stands next to what torch.compile, AOTInductor and stock ONNX Runtime do.

- ``compile``: ``torch.compile`` (inductor) of the eager model;
- ``aoti``: an AOTInductor package of the ``torch.export`` program, compiled here;
- ``ort-default``: stock ONNX Runtime: the model's plain ONNX export (``torch.export`` → ONNX, fp32,
  no passes, one segment) with ONNX Runtime's default session options;
- ``ort-quantize-dynamic``: that ONNX through ``onnxruntime.quantization.quantize_dynamic`` with the
  settings that run on mixer models (``per_channel=False``, int8 weights; ``per_channel=True`` fails
  at run time on per-token ``[T,D,H]`` weights: "MatMulInteger : b zero point is not valid"), on
  ONNX Runtime's defaults — what a user reaching for int8 on CPU gets today;
- ``openvino``: that ONNX compiled by OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=f32``;
- ``openvino-default``: the same with OpenVINO's own precision choice (bf16 on CPUs with AVX-512
  BF16 or AMX, f32 elsewhere); the runner's name says which it picked;
- ``nncf-int8``: NNCF's post-training int8 quantization (``nncf.quantize``, its defaults) of that
  OpenVINO model, calibrated on the bundle's own sample request (``inputs/sample.npz``), compiled
  with OpenVINO's defaults — what a user reaching for int8 with OpenVINO gets.

Every OpenVINO runner uses ``PERFORMANCE_HINT=LATENCY`` (one request at a time, as timed here). A
peer whose package is not installed is skipped with the package named (:func:`unavailable_peers`),
so ``bench`` still times the others.

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

PEERS = ("compile", "aoti", "ort-default", "ort-quantize-dynamic", "openvino", "openvino-default", "nncf-int8")
#: The Python packages a peer needs beyond mixexport's own dependencies.
PEER_PACKAGES = {"openvino": ("openvino",), "openvino-default": ("openvino",), "nncf-int8": ("openvino", "nncf")}
ONNX_PEERS = ("ort-default", "ort-quantize-dynamic", "openvino", "openvino-default", "nncf-int8")


def unavailable_peers(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """{peer: why it cannot run here} for the ``names`` whose packages do not import."""
    import importlib.util

    out = {}
    for name in names:
        missing = [pkg for pkg in PEER_PACKAGES.get(name, ()) if importlib.util.find_spec(pkg) is None]
        if missing:
            out[name] = (f"peer {name} needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
                         f'not installed: pip install "mixexport[openvino]"')
    return out


def _torch_runner(fn: Callable[..., Any], source: Source) -> Callable[[Request], Any]:
    import torch

    def run(req: Request) -> Any:
        with torch.inference_mode():
            return fn(**{k: torch.from_numpy(v) for k, v in req.rows().items()})

    return run


def make_peers(names: tuple[str, ...] | list[str], source: Source, say: Callable[[str], None],
               calibration: Request | None = None) -> dict[str, Callable[[Request], Any]]:
    """Runners of the named peers; their compiled or exported files are loaded into memory and the
    temporary directories removed before this returns. Peers whose packages are missing are
    skipped, each named through ``say``. ``calibration``: the bundle's sample request (NNCF's
    calibration data); default: the one a build writes (2 users x 16 candidates, seed 0)."""
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise BadInputError(f"unknown peers {unknown}; known: {', '.join(PEERS)}", "e.g. --peers compile,aoti")
    for name, reason in unavailable_peers(names).items():
        say(f"skipped: {reason}")
        names = [n for n in names if n != name]
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
    onnx_peers = [n for n in ONNX_PEERS if n in names]
    if onnx_peers:
        say("peer: plain ONNX export (fp32, no passes)")
        with tempfile.TemporaryDirectory(prefix="mixexport-ort-") as tmp:
            plain = plain_onnx(source, Path(tmp) / "model.onnx")
            if "ort-default" in names:
                out["ort-default"] = _ort_runner(plain)
            if "ort-quantize-dynamic" in names:
                say("peer: onnxruntime.quantization.quantize_dynamic (per_channel=False)")
                out["ort-quantize-dynamic"] = _ort_runner(quantize_dynamic_model(plain, Path(tmp) / "model.qdq.onnx"))
            ov_peers = [n for n in ("openvino", "openvino-default", "nncf-int8") if n in names]
            if ov_peers:
                sample = calibration or source.example_request(2, 16, seed=0)
                out.update(openvino_peers(ov_peers, plain, sample.rows(), say))
    return out


def openvino_peers(names: list[str], onnx_path: Path, calibration: dict[str, np.ndarray],
                   say: Callable[[str], None]) -> dict[str, Callable[[Request], Any]]:
    """The OpenVINO peers of ``names`` on the ONNX file ``onnx_path`` (read into memory here).
    Each runner's name says the precision OpenVINO ran at (``openvino-default (bf16)``)."""
    import openvino as ov

    core = ov.Core()
    latency = {"PERFORMANCE_HINT": "LATENCY"}
    out: dict[str, Callable[[Request], Any]] = {}
    if "openvino" in names:
        say("peer: OpenVINO, f32")
        out["openvino (f32)"] = _ov_runner(core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                                              {**latency, "INFERENCE_PRECISION_HINT": "f32"}))
    if "openvino-default" in names:
        compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", latency)
        picked = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        say(f"peer: OpenVINO, its default precision here ({picked})")
        out[f"openvino-default ({picked})"] = _ov_runner(compiled)
    if "nncf-int8" in names:
        import nncf

        from mixexport.backends.openvino_int8 import quiet_nncf

        say("peer: NNCF post-training int8 quantization (calibrated on the bundle's sample request)")
        with quiet_nncf(nncf):  # its log and progress bars would land in bench --json's stdout
            quantized = nncf.quantize(core.read_model(str(onnx_path)), nncf.Dataset([calibration]),
                                      subset_size=1)
        compiled = core.compile_model(quantized, "CPU", latency)
        picked = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        out[f"nncf-int8 (int8 + {picked})"] = _ov_runner(compiled)
    return out


def _ov_runner(compiled: Any) -> Callable[[Request], Any]:
    request = compiled.create_infer_request()

    def run(req: Request) -> list[np.ndarray]:
        results = request.infer(req.rows(), share_inputs=True)
        return [np.array(results[o]) for o in compiled.outputs]

    return run


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

"""OpenVINO backend (``--target openvino``, CPU): every ONNX segment, after every pass, converted to
OpenVINO IR (``engines/<segment>.openvino.xml`` + ``.bin``) and compiled by OpenVINO's CPU plugin.

- **Precision is explicit.** OpenVINO's CPU plugin picks bf16 by default on CPUs with AVX-512 BF16
  or AMX; a bundle never inherits that. Its session options record ``inference_precision``
  (``f32`` unless the build asked ``--precision bf16``), passed as ``INFERENCE_PRECISION_HINT``.
  The IR keeps float32 weights (``save_model(compress_to_fp16=False)``): the precision is a
  property of the compiled model, not of the file.
- **bf16** needs a CPU with native bf16 GEMMs (``avx512_bf16`` or ``amx_bf16``): the build refuses
  it elsewhere (exit 3) instead of emulating it, and the session options name the CPU features a
  serving machine must have (``requires_cpu``), checked before the model is read.
- **Threads** come from the session options (``num_threads``; 0 is OpenVINO's default, every
  core); ``performance_hint`` is ``LATENCY`` (one stream: a request is one inference).
- **Loading** reads the IR's two files once, checks their sha256 against the manifest's ``files``
  and hands those very bytes to ``Core.read_model(model=xml_bytes, weights=Tensor)``: OpenVINO
  never opens a path, so nothing is read between the check and the load.

The ONNX segments stay in the bundle (the reference form, and what ``--backend onnxruntime``
runs); split, KV cache and MoE packing are ONNX-stage or program-stage rewrites, so the IR carries
them as they are.
"""

from __future__ import annotations

import platform
import queue
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from mixexport.backends.base import SessionBase
from mixexport.bundle import Bundle, BundleWriter, Manifest, SegmentEntry
from mixexport.errors import BadInputError, EnvironmentUnavailableError
from mixexport.machine import cpu_info, has_flags

INSTALL_HINT = 'pip install "mixexport[openvino]"'
#: ``--precision`` → OpenVINO's ``INFERENCE_PRECISION_HINT`` (int8: the GEMMs NNCF quantized run
#: int8, everything else f32; see :mod:`mixexport.backends.openvino_int8`).
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
#: Any one of these runs bf16 GEMMs natively (``/proc/cpuinfo`` spelling); OpenVINO uses them for bf16.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_REQUIREMENT = "|".join(BF16_FLAGS)


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it does not import."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.get_version()


def missing_features(required: list[str] | tuple[str, ...], has: Callable[[str], bool] = has_flags) -> list[str]:
    """The entries of ``required`` this CPU lacks (``has`` says whether it has one flag). An entry
    is one flag or several joined by ``|``, any one of which will do (``avx512_bf16|amx_bf16``)."""
    return [req for req in required if not any(has(flag) for flag in req.split("|"))]


def int8_unavailable_reason(has: Callable[[str], bool] = has_flags) -> str | None:
    """None when this CPU has an int8 dot product (VNNI / AMX-INT8); else a one-line reason."""
    from mixexport.backends.openvino_int8 import VNNI_REQUIREMENT

    if not missing_features([VNNI_REQUIREMENT], has):
        return None
    return (f"--target openvino --precision int8 needs an int8 dot product ({VNNI_REQUIREMENT.replace('|', ', ')}; "
            f"without it 8-bit GEMMs saturate); this CPU ({cpu_info()['model']}) has none")


def bf16_unavailable_reason(has: Callable[[str], bool] = has_flags) -> str | None:
    """None when this CPU runs bf16 GEMMs natively; else a one-line reason naming the CPU and its flags.
    ``has`` says whether the CPU has a flag (this one's by default)."""
    if not missing_features([BF16_REQUIREMENT], has):
        return None
    info = cpu_info()
    return (f"--precision bf16 on CPU needs AVX-512 BF16 or AMX ({', '.join(BF16_FLAGS)}); this CPU "
            f"({info['model']}; flags {' '.join(f for f in info['flags'] if has(f)) or 'none of note'}) has neither")


def engine_paths(segment: str) -> tuple[str, str]:
    """Where a segment's IR lives inside the bundle: (.xml, .bin)."""
    stem = f"engines/{segment}.openvino"
    return f"{stem}.xml", f"{stem}.bin"


def read_checked(manifest: Manifest, rel: str) -> bytes:
    """The bytes of ``rel`` read once and checked against its sha256 in the manifest's ``files``
    (:func:`mixexport.checked_load.read_checked`: the same read, path rule and hash as every segment)."""
    from mixexport.checked_load import read_checked as read_checked_file

    return read_checked_file(manifest.root, manifest.data["files"], rel, as_bytes=True).data  # type: ignore[return-value]


class OpenVinoSession(SessionBase):
    """One compiled segment. Infer requests are not thread-safe: each ``run`` takes one from a
    pool (creating one when all are busy), so concurrent ``run`` calls never share one."""

    def __init__(self, xml: bytes, weights: bytes, options: Mapping[str, Any], segment: SegmentEntry) -> None:
        import openvino as ov

        core = ov.Core()
        # the Tensor wraps the checked bytes (no copy); the compiled model keeps what it needs
        self._weights = np.frombuffer(weights, dtype=np.uint8)
        config = compile_config(options)
        try:
            model = core.read_model(model=xml, weights=ov.Tensor(self._weights))
        except RuntimeError as e:  # OpenVINO's parse errors are untyped; one line, no traceback
            first = (str(e).strip().splitlines() or ["unreadable"])[0]
            raise BadInputError(f"the OpenVINO IR of segment {segment.name!r} does not load: {first[:240]}",
                                "rebuild the bundle") from None
        # the runtime feeds and cuts tensors by the manifest's specs: they must be the IR's
        found = sorted((i.get_any_name(), np.dtype(i.get_element_type().to_dtype()).name) for i in model.inputs), \
            [(o.get_any_name(), np.dtype(o.get_element_type().to_dtype()).name) for o in model.outputs]
        expected = sorted((s.name, s.dtype) for s in segment.inputs), [(s.name, s.dtype) for s in segment.outputs]
        if found != expected:
            raise BadInputError(f"the OpenVINO IR of segment {segment.name!r} has inputs {found[0]} and outputs "
                                f"{found[1]}, the manifest {expected[0]} and {expected[1]}", "rebuild the bundle")
        self.compiled = core.compile_model(model, "CPU", config)
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # share_inputs: no copy of the feeds; outputs are copied (the request's buffers are reused)
            results = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_inputs=True)
            return {name: np.array(results[k]) for name, k in zip(self.output_names, self.compiled.outputs)}
        finally:
            self._requests.put(request)

    def close(self) -> None:
        """Drop the compiled model, its infer requests and the weights buffer."""
        self.compiled, self._requests, self._weights = None, queue.SimpleQueue(), None
        super().close()


def compile_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """OpenVINO CPU properties from a segment's session options (see the module docstring); a
    value OpenVINO would not take is refused with the manifest key named."""
    precision = options.get("inference_precision", "f32")
    hint = options.get("performance_hint", "LATENCY")
    threads = options.get("num_threads", 0)
    if precision not in set(PRECISION_HINTS.values()):
        raise BadInputError(f"session_options.inference_precision is {str(precision)[:40]!r}, not one of "
                            f"{sorted(set(PRECISION_HINTS.values()))}", "rebuild the bundle")
    if hint not in ("LATENCY", "THROUGHPUT"):
        raise BadInputError(f"session_options.performance_hint is {str(hint)[:40]!r}, not LATENCY or THROUGHPUT",
                            "rebuild the bundle")
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= 1024:
        raise BadInputError(f"session_options.num_threads is {str(threads)[:40]!r}, not an integer in [0, 1024]",
                            "rebuild the bundle")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoBackend:
    """``--target openvino``: OpenVINO IR of the ONNX segments, run by OpenVINO's CPU plugin."""

    name = "openvino"
    PRECISIONS = tuple(PRECISION_HINTS)

    @property
    def needs_calibration(self) -> bool:
        """int8: the build records every segment's feeds (:attr:`calibration`) before compiling."""
        return self.precision == "int8"

    def __init__(self, device: str = "cpu", precision: str = "fp32") -> None:
        self.device = device
        self.precision = precision
        self.engine_reports: dict[str, dict[str, Any]] = {}
        #: int8: {segment: feeds it saw}, set by the build before :meth:`compile`
        #: (:func:`mixexport.backends.openvino_int8.calibration_feeds`)
        self.calibration: dict[str, list[dict[str, np.ndarray]]] | None = None

    def for_precision(self, precision: str) -> OpenVinoBackend:
        """This backend compiling at ``precision`` (fp32, or bf16 on a CPU with bf16 GEMMs: exit 3
        elsewhere). Other precisions are refused as usage errors."""
        if precision not in PRECISION_HINTS:
            raise BadInputError(f"--target openvino builds --precision {' or '.join(PRECISION_HINTS)}; "
                                f"found --precision {precision}", "use --target onnx for that precision")
        if precision == "bf16":
            reason = bf16_unavailable_reason()
            if reason:
                raise EnvironmentUnavailableError(reason, "build --precision fp32, or on a CPU with AVX-512 BF16 "
                                                          "or AMX (Intel Sapphire Rapids+, AMD Zen 4+)")
        if precision == "int8":
            reason = int8_unavailable_reason()
            if reason:
                raise EnvironmentUnavailableError(reason, "build --target onnx --precision int8 (7-bit weights, "
                                                          "safe on AVX2), or on a CPU with VNNI")
        return OpenVinoBackend(self.device, precision)

    def unavailable_reason(self) -> str | None:
        if self.device != "cpu":
            return f"--target openvino runs on CPU only (found --device {self.device}): use --device cpu"
        if openvino_version() is None:
            return f"OpenVINO is not installed: {INSTALL_HINT}"
        return None

    def session_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"inference_precision": PRECISION_HINTS[self.precision],
                                   "performance_hint": "LATENCY", "num_threads": 0}
        if self.precision == "bf16":
            options["requires_cpu"] = [BF16_REQUIREMENT]
        if self.precision == "int8":
            from mixexport.backends.openvino_int8 import VNNI_REQUIREMENT

            options["requires_cpu"] = [VNNI_REQUIREMENT]
        return options

    def compile(self, bundle: Bundle, writer: BundleWriter, progress: Any) -> dict[str, dict[str, str]]:
        """One IR per segment, converted from the segment's ONNX file as written to the bundle
        (its external data included)."""
        import openvino as ov

        core = ov.Core()
        out: dict[str, dict[str, str]] = {}
        calibration = self.calibration if self.precision == "int8" else None
        if self.precision == "int8":
            from mixexport.backends.openvino_int8 import int8_check, quantize_model

            if calibration is None:
                raise BadInputError("--precision int8 on OpenVINO needs calibration feeds, and the build set none",
                                    "report this as a bug")
        for seg in bundle.segments:
            xml, weights = engine_paths(seg.name)
            progress(f"OpenVINO IR of segment {seg.name}")
            start = time.perf_counter()
            model = core.read_model(str(writer.path(f"segments/{seg.name}.onnx")))
            int8 = None
            if calibration is not None:
                progress(f"int8: NNCF post-training quantization of segment {seg.name}")
                float_bytes = sum(c.get_byte_size() for c in model.get_ops() if c.get_type_name() == "Constant")
                model, quant = quantize_model(model, calibration[seg.name])
            ov.save_model(model, writer.path(xml), compress_to_fp16=False)
            if calibration is not None:
                int8 = {**int8_check(quant, writer.path(weights).stat().st_size, float_bytes), "quantization": quant}
            out[seg.name] = {self.name: xml}
            # the same keys as TensorRT's report (build's summary line), plus what a serving CPU is checked for
            self.engine_reports[seg.name] = {
                "library": "OpenVINO", "version": ov.get_version(), "archs": [f"cpu-{platform.machine().lower()}"],
                "bytes": writer.path(xml).stat().st_size + writer.path(weights).stat().st_size,
                "seconds": round(time.perf_counter() - start, 3), "weights": weights,
                "inference_precision": PRECISION_HINTS[self.precision], "built_on_cpu": cpu_info(),
                **({"int8": int8} if int8 else {})}
        if calibration is not None and all(r["int8"]["status"] == "SKIPPED" for r in self.engine_reports.values()):
            raise BadInputError("--precision int8 on OpenVINO found no GEMM after a normalization to quantize "
                                 "(the input projections stay float), so the bundle would be float",
                                 "build --precision fp32 or bf16")
        return out

    def prepare(self, manifest: Manifest, segment: SegmentEntry, workdir: Path | None = None) -> OpenVinoSession:
        xml = segment.engines.get(self.name)
        if not xml:
            raise BadInputError(f"segment {segment.name!r} has no OpenVINO IR (bundle target "
                                f"{manifest.data.get('target')!r})",
                                "rebuild with --target openvino, or run it with --backend onnxruntime")
        options = segment.session_options if segment.backend == self.name else self.session_options()
        missing = missing_features(list(options.get("requires_cpu") or []))
        if missing:
            info = cpu_info()
            raise EnvironmentUnavailableError(
                f"segment {segment.name!r} runs at {options.get('inference_precision')} and needs the CPU features "
                f"{', '.join(missing)}, which this CPU ({info['model']}) lacks",
                "serve it on a CPU that has them, or rebuild with --precision fp32")
        weights = xml.removesuffix(".xml") + ".bin"
        return OpenVinoSession(read_checked(manifest, xml), read_checked(manifest, weights), options, segment)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "openvino": openvino_version(),
                "session_options": self.session_options(), "cpu": cpu_info()}

"""TensorRT backends (``--target trt``: module ``tensorrt`` >= 10; ``--target trt-rtx``: TensorRT for
RTX, module ``tensorrt_rtx``). Both expose the same Builder / OnnxParser / BuilderConfig /
optimization-profile API, so one code path serves both; the module is imported lazily (never at
import of this file).

Building and running are separate questions:

- **TensorRT-RTX builds without a GPU**: its ahead-of-time phase is CPU-only, for the compute
  capabilities it is told (``--arch sm80,sm86``; default :data:`RTX_DEFAULT_ARCHS`, the ones
  TensorRT-RTX 1.7 targets by default). No timing cache (one makes it query for a GPU). Running
  its engines needs a GPU of one of those capabilities (not compute capability 9.0: H100/H200).
- **TensorRT** (>= 10) builds for the GPU it runs on, so it needs one to build; it reuses a timing
  cache file: ``$MIXEXPORT_TIMING_CACHE`` if set, else
  ``~/.cache/mixexport/<backend>-<version>-<arch>.timing-cache`` (``$XDG_CACHE_HOME`` respected).

Build (one engine per segment, from the bundle's ONNX, :func:`.trt_build.build_engine`): strongly
typed networks (precision from the graph), the parsed network's I/O checked against the manifest,
one optimization profile per engine derived per axis from what the model declares
(:mod:`.trt_profiles`; ``--shapes NAME:MIN,OPT,MAX``), ``--version-compatible`` for TensorRT.
Engines land at ``engines/<segment>.<backend>.<arch>.plan`` (``arch``: the GPU's ``sm<major><minor>``
for TensorRT, the ``-``-joined target list for TensorRT-RTX); each segment's manifest entry records
the library and version, the compute capabilities, the profile, the build time, the engine's bytes
and the builder's warnings. For W8A16 bundles every int8 segment is also built from its
dequantized float twin, and the int8 engine must be smaller by about what int8 storage saves.

Run: :class:`TrtSession` uses torch CUDA tensors as device buffers (``set_tensor_address``,
``execute_async_v3`` on a private stream); one execution context per session, runs serialized.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from mixexport.backends.base import SessionBase
from mixexport.backends.trt_build import (EngineBuild, build_engine, dequantized_twin, int8_engine_check,
                                          require_int8_engines)
from mixexport.backends.trt_profiles import (DEFAULT_PROFILE, Profile, axis_profile, check_shapes_apply,
                                             derive_profile, parse_shapes, resolve_axes)
from mixexport.bundle import Bundle, BundleWriter, Manifest, SegmentEntry
from mixexport.checked_load import CheckedFile, read_checked
from mixexport.errors import BadInputError, EnvironmentUnavailableError
from mixexport.specs import TensorSpec

__all__ = ["DEFAULT_PROFILE", "RTX_DEFAULT_ARCHS", "EngineBuild", "Profile", "TensorRTBackend",
           "TensorRTRtxBackend", "axis_profile", "build_engine", "check_shapes_apply", "derive_profile",
           "engine_entries", "engine_path", "parse_arch", "parse_shapes", "resolve_axes", "timing_cache_path"]

#: What TensorRT-RTX 1.7 builds for when no compute capability is set (set explicitly, so that the
#: manifest says what the engine holds).
RTX_DEFAULT_ARCHS = ("sm80", "sm86", "sm89", "sm120")
_ARCH_RE = re.compile(r"^(?:sm_?)?(\d{1,2})\.?(\d)$")


def parse_arch(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``--arch sm80,sm86`` (also ``8.6``, ``86``, ``sm_86``) → ``("sm80", "sm86")``, in the order given."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        m = _ARCH_RE.match(item)
        if not m:
            raise BadInputError(f"--arch {item!r}: expected a compute capability like sm86 or 8.6",
                                "e.g. --arch sm80,sm86,sm89,sm120")
        arch = f"sm{m.group(1)}{m.group(2)}"
        if arch in out:
            raise BadInputError(f"--arch gives {arch} twice", "list each compute capability once")
        out.append(arch)
    return tuple(out)


def engine_path(segment: str, backend: str, arch: str) -> str:
    """``engines/<segment>.<backend>.<arch>.plan`` inside the bundle."""
    return f"engines/{segment}.{backend}.{arch}.plan"


def engine_entries(segments: Iterable[str], backend: str, arch: str) -> dict[str, dict[str, str]]:
    """The ``compile`` result recorded per segment in the manifest: {segment: {backend: path}}."""
    return {name: {backend: engine_path(name, backend, arch)} for name in segments}


def gpu_arch() -> str:
    """``sm<major><minor>`` of the current CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def timing_cache_path(backend: str, version: str, arch: str) -> Path:
    """Where the timing cache shared across builds lives (see the module docstring)."""
    explicit = os.environ.get("MIXEXPORT_TIMING_CACHE")
    if explicit:
        return Path(explicit)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixexport"
    return root / f"{backend}-{version}-{arch}.timing-cache"


_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32",
                 "INT64": "int64", "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


def _torch_dtype(trt_dtype: Any) -> Any:
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TORCH_DTYPES:
        raise BadInputError(f"engine I/O tensor of TensorRT type {name} is not supported here",
                            "keep segment inputs/outputs float, int32/int64 or bool")
    return getattr(torch, _TORCH_DTYPES[name])


class TrtSession(SessionBase):
    """One deserialized engine: numpy in, numpy out through torch CUDA buffers."""

    def __init__(self, trt: Any, plan: bytes | bytearray, segment: SegmentEntry, label: str, host_code: bool) -> None:
        import torch

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if host_code:  # a version-compatible engine embeds its lean runtime
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EnvironmentUnavailableError(f"{label} could not load the engine of segment {segment.name!r} "
                                              "(built for another GPU or library version?)",
                                              "rebuild the bundle on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.out_dtypes = {s.name: s.dtype for s in segment.outputs}
        self.stream = torch.cuda.Stream()
        self.lock = threading.Lock()  # one execution context: its shapes/addresses are per-run state

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        self._check_open()
        with self.lock, torch.cuda.stream(self.stream):
            keep = []
            for name in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", dtype=self.dtypes[name])
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
                keep.append(t)  # the buffers must outlive the asynchronous run
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            self.stream.synchronize()
        return {n: self._to_numpy(n, o) for n, o in outs.items()}

    def _to_numpy(self, name: str, t: Any) -> np.ndarray:
        import torch

        t = t.cpu()
        arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        want = self.out_dtypes.get(name)
        # int64 outputs may run as int32 inside the engine; bf16 stays float32 (numpy has no bf16)
        return arr.astype(want) if want and want != "bfloat16" and arr.dtype != np.dtype(want) else arr

    def close(self) -> None:
        """Release the execution context, engine, runtime and stream (in that order: a context
        must go before its engine, the engine before its runtime)."""
        with self.lock:
            for attr in ("context", "engine", "runtime", "stream"):
                if getattr(self, attr, None) is not None:
                    setattr(self, attr, None)
            super().close()


class TensorRTBackend:
    """``--target trt``: TensorRT >= 10 engines per segment, built and run on the current CUDA GPU."""

    name = "tensorrt"
    label = "TensorRT"
    #: ``prepare`` takes the checked bytes (:func:`mixexport.checked_load.open_sessions`)
    loads_checked = True
    modules: tuple[str, ...] = ("tensorrt",)
    extra = "trt"
    min_major = 10
    consumes = "onnx"
    #: TensorRT proper builds for the GPU it runs on; TensorRT-RTX builds ahead of time on a CPU
    builds_without_gpu = False
    #: BuildOptions fields this backend accepts (mixexport build --shapes / --version-compatible / --arch)
    BUILD_SETTINGS = ("shapes", "version_compatible", "arch")
    #: pass options a build for this backend uses unless the user sets them (--option)
    PASS_DEFAULTS = {"quantize-w8a16": {"embedding_form": "dequantize-first"}}

    def __init__(self, device: str = "cuda", shapes: Mapping[str, Profile] | None = None,
                 version_compatible: bool = False, arch: Iterable[str] = ()) -> None:
        if device != "cuda":
            raise BadInputError(f"{self.label} engines run on CUDA GPUs only, not on {device}",
                                "pass --device cuda")
        self.device = device
        self.shapes = dict(shapes or {})
        self.version_compatible = bool(version_compatible)
        self.arch = parse_arch(arch)
        if self.arch and not self.builds_without_gpu:
            raise BadInputError(f"--arch: {self.label} builds for the GPU it runs on",
                                "drop --arch, or use --target trt-rtx to build for other GPUs")
        if self.version_compatible and self.builds_without_gpu:
            raise BadInputError(f"--version-compatible is not supported by {self.label}", "drop --version-compatible")
        self.engine_reports: dict[str, dict[str, Any]] = {}

    def _import(self) -> tuple[Any, str]:
        errors = []
        for module in self.modules:
            try:
                return importlib.import_module(module), ""
            except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError
                errors.append(f"{module}: {type(e).__name__}")
        return None, "; ".join(errors)

    def module(self, build: bool = False) -> Any:
        """The imported library; raises (exit 3) when it cannot build (``build``) or run here."""
        reason = self.build_unavailable_reason() if build else self.unavailable_reason()
        if reason:
            raise EnvironmentUnavailableError(reason)
        return self._import()[0]

    def _library_reason(self) -> str | None:
        trt, why = self._import()
        install = f'pip install "mixexport[{self.extra}]"'
        if trt is None:
            return f"{self.label} (Python module {self.modules[0]}) is not installed ({why}): {install}"
        version = str(getattr(trt, "__version__", "0"))
        if int(re.match(r"\d*", version).group() or 0) < self.min_major:
            return f"{self.label} >= {self.min_major} is needed, found {version}: {install}"
        return None

    def _gpu_reason(self) -> str | None:
        try:
            import torch
        except ImportError:
            return f"{self.label} sessions use torch CUDA tensors, but torch is not installed"
        if not torch.cuda.is_available():
            return f"{self.label} needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False)"
        return None

    def build_unavailable_reason(self) -> str | None:
        """None when engines can be built here (TensorRT-RTX: the library; TensorRT: and a GPU)."""
        return self._library_reason() or (None if self.builds_without_gpu else self._gpu_reason())

    def unavailable_reason(self) -> str | None:
        """None when engines can run here: the library and a CUDA GPU."""
        return self._library_reason() or self._gpu_reason()

    def engines_unavailable_reason(self, manifest: Manifest) -> str | None:
        """None when this machine can execute the bundle's engines; else why not, naming the
        compute capabilities they were built for."""
        archs = sorted({a for seg in manifest.segments for a in (seg.session_options or {}).get("archs") or []},
                       key=lambda a: int(a[2:]) if a[2:].isdigit() else 0)
        built = ",".join(archs) or "an unrecorded GPU"
        reason = self.unavailable_reason()
        if reason is None:
            here = gpu_arch()
            if archs and here not in archs:
                reason = f"this GPU is {here}"
        return None if reason is None else f"engines built for {built}, not executed here: no compatible GPU ({reason})"

    def target_archs(self) -> tuple[str, ...]:
        return (gpu_arch(),)

    def session_options(self) -> dict[str, Any]:
        return {"device": "cuda", "strongly_typed": True, "version_compatible": self.version_compatible,
                "archs": list(self.arch) if self.arch else None,
                "profile": {k: list(v) for k, v in {**DEFAULT_PROFILE, **self.shapes}.items()}}

    def compile(self, bundle: Bundle, writer: BundleWriter, progress: Any) -> dict[str, dict[str, str]]:
        """Parse each segment's ONNX (as written in the bundle) and build its engine; W8A16 segments
        are weighed against their float twin's engine. Details per segment: :attr:`engine_reports`."""
        jobs = [_Job(seg.name, writer.tmp / f"segments/{seg.name}.onnx", seg.onnx, seg.inputs, seg.outputs,
                     _int8_saving([dataclasses.asdict(p) for p in bundle.passes], seg.name))
                for seg in bundle.segments]
        return self._build(jobs, bundle.source.multiples, bundle.source.minimums,
                           lambda rel, plan: writer.path(rel).write_bytes(plan), progress, bundle.source.maximums)

    def compile_bundle(self, manifest: Manifest, out: Path, progress: Any = lambda _m: None
                       ) -> dict[str, dict[str, Any]]:
        """Build the engines of an existing bundle's ONNX segments into ``out`` (not into the bundle):
        the check a CI runs on bundles built for other targets. Returns :attr:`engine_reports`."""
        import onnx

        model = manifest.data["model"]
        jobs = [_Job(seg.name, manifest.file(seg.file), onnx.load(manifest.file(seg.file)), seg.inputs, seg.outputs,
                     _int8_saving(manifest.data.get("passes", []), seg.name)) for seg in manifest.segments]

        def write(rel: str, plan: bytes) -> None:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(plan)

        self._build(jobs, model.get("multiples") or {}, model.get("minimums") or {}, write, progress,
                    model.get("maximums") or {})
        return self.engine_reports

    def _build(self, jobs: list[_Job], multiples: Mapping[str, Any], minimums: Mapping[str, int],
               write: Callable[[str, bytes], None], progress: Any,
               maximums: Mapping[str, int] | None = None) -> dict[str, dict[str, str]]:
        trt = self.module(build=True)
        check_shapes_apply(self.shapes, jobs, multiples)
        archs = self.target_archs()
        version = str(trt.__version__)
        cache_file = None if self.builds_without_gpu else timing_cache_path(self.name, version, archs[0])
        cache = (cache_file.read_bytes() if cache_file.is_file() else b"") if cache_file else None
        entries = engine_entries([j.name for j in jobs], self.name, "-".join(archs))
        common = {"label": self.label, "version_compatible": self.version_compatible,
                  "archs": archs if self.builds_without_gpu else (), "multiples": multiples, "minimums": minimums,
                  "maximums": maximums or {}}
        int8_checks: dict[str, dict[str, Any]] = {}
        for job in jobs:
            progress(f"{self.label}: building the engine of segment {job.name} for {','.join(archs)}")
            built = build_engine(trt, job.path, job.inputs, job.outputs, self.shapes, timing_cache=cache, **common)
            cache = built.timing_cache
            write(entries[job.name][self.name], built.plan)
            report = {"library": self.label, "version": version, **built.report, "archs": list(archs)}
            # the twin copies the whole model: only worth it where a DequantizeLinear may read int8
            has_dq = any(n.op_type == "DequantizeLinear" for n in job.model.graph.node)
            twin, count = dequantized_twin(job.model) if has_dq else (None, 0)
            if count:
                progress(f"{self.label}: building segment {job.name}'s float twin (int8 weights check)")
                from mixexport.export import save_onnx

                with tempfile.TemporaryDirectory(prefix="mixexport-twin-") as tmp:
                    path = Path(tmp) / f"{job.name}.onnx"
                    save_onnx(twin, path)
                    ref = build_engine(trt, path, job.inputs, job.outputs, self.shapes, timing_cache=cache,
                                       check_io=False, **common)
                    cache = ref.timing_cache
                report["int8"] = int8_checks[job.name] = int8_engine_check(len(built.plan), len(ref.plan),
                                                                           job.int8_saving)
            self.engine_reports[job.name] = report
        if cache_file is not None and cache is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp_file = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
            tmp_file.write_bytes(cache)
            os.replace(tmp_file, cache_file)  # atomic: concurrent builds never read half a cache
        require_int8_engines(int8_checks, self.label)
        return entries

    def prepare(self, manifest: Manifest, segment: SegmentEntry, workdir: Path | None = None,
                checked: CheckedFile | None = None) -> TrtSession:
        """Deserialize ``segment``'s plan from the bytes that were checked: ``checked`` (read by
        :func:`~mixexport.checked_load.open_sessions`), else read and checked here."""
        rel = segment.engines.get(self.name)
        if not rel:
            raise BadInputError(f"segment {segment.name!r} has no {self.label} engine (bundle target "
                                f"{manifest.data.get('target')!r})", "rebuild with the matching --target")
        trt = self.module()
        here = gpu_arch()
        archs = (segment.session_options or {}).get("archs") or [rel.rsplit(".", 2)[-2]]
        if here not in archs:
            raise EnvironmentUnavailableError(f"{rel} was built for {','.join(archs)}, not for this GPU ({here})",
                                              "rebuild the bundle for this GPU (--arch with trt-rtx)")
        host_code = bool(segment.session_options.get("version_compatible"))
        if checked is None:
            checked = read_checked(manifest.root, manifest.data["files"], rel, as_bytes=True)
        return TrtSession(trt, checked.data, segment, self.label, host_code)

    def describe(self) -> dict[str, Any]:
        trt = self.module()
        return {"backend": self.name, "device": "cuda", "version": str(trt.__version__), "arch": gpu_arch(),
                **self.session_options()}


class TensorRTRtxBackend(TensorRTBackend):
    """``--target trt-rtx``: TensorRT for RTX. Builds without a GPU for the compute capabilities it is
    given; runs on 8.0, 8.6, 8.9 and 12.x (on an H100/H200, compute capability 9.0, it refuses)."""

    name = "tensorrt-rtx"
    label = "TensorRT-RTX"
    modules = ("tensorrt_rtx", "tensorrt_rtx_bindings")
    extra = "trt-rtx"
    min_major = 1
    builds_without_gpu = True

    def target_archs(self) -> tuple[str, ...]:
        return self.arch or RTX_DEFAULT_ARCHS

    def session_options(self) -> dict[str, Any]:
        return {**super().session_options(), "archs": list(self.target_archs())}


@dataclass(frozen=True)
class _Job:
    """One engine to build: a segment's ONNX file (and its proto, for the float twin) and specs."""

    name: str
    path: Path
    model: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    int8_saving: int


def _int8_saving(passes: Iterable[Mapping[str, Any]], segment: str) -> int:
    """Bytes the int8 weights of ``segment`` save in the ONNX file (quantize-w8a16's report)."""
    record = next((p for p in passes if p.get("name") == "quantize-w8a16"), None)
    layers = ((record or {}).get("report") or {}).get("layers") or []
    return sum(x["bytes_before"] - x["bytes_after"] for x in layers if x.get("segment") == segment)

"""TensorRT backends (``--target trt``: module ``tensorrt`` >= 10; ``--target trt-rtx``: TensorRT for
RTX, module ``tensorrt_rtx_bindings``). Both expose the same Builder / OnnxParser / BuilderConfig /
optimization-profile API, so one code path serves both; the module is imported lazily (never at
import of this file), and without it — or without a CUDA GPU — the backend is unavailable (exit 3).

Build (one engine per segment, from the bundle's ONNX):

- **strongly typed** networks: precision comes from the ONNX graph (``--precision``, int8 weights
  of ``quantize-w8a16``), never from builder flags;
- one **optimization profile** per engine on the symbolic axes of the manifest's input specs, with
  (min, opt, max) per axis name from :data:`DEFAULT_PROFILE` — rows ``batch`` and ``candidates``
  1 / 256 / 4096 (256 is the middle of the N range the latency report covers; 4096 bounds the
  activation memory TensorRT reserves), ``users`` 1 / 1 / 256 (serving is 1 user × N), ``seq``
  1 / 128 / 1024 — overridable with ``mixexport build --shapes NAME:MIN,OPT,MAX`` (repeatable);
- a **timing cache** file reused across builds: ``$MIXEXPORT_TIMING_CACHE`` if set, else
  ``~/.cache/mixexport/<backend>-<version>-<arch>.timing-cache`` (``$XDG_CACHE_HOME`` respected);
- ``--version-compatible`` sets ``BuilderFlag.VERSION_COMPATIBLE`` (the runtime then allows the
  engine's embedded lean runtime);
- engines land at ``engines/<segment>.<backend>.<arch>.plan`` with the GPU's ``sm<major><minor>``.

Run: :class:`TrtSession` uses torch CUDA tensors as device buffers (``set_tensor_address``,
``execute_async_v3`` on a private stream); one execution context per session, runs serialized.

Verification status: the library-free parts (profiles, ``--shapes``, names, manifest entries, the
exit-3 path) are unit-tested; building and running engines has not been run on this project's CI
(no TensorRT, no GPU there). The API names used were checked against the tensorrt-rtx-cu13-bindings
1.7.1 wheel; ``scripts/gpu_check.py`` parses and builds every segment with TensorRT-RTX on an H100.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mixexport.backends.base import SessionBase
from mixexport.bundle import Bundle, BundleWriter, Manifest, SegmentEntry
from mixexport.errors import BadInputError, EnvironmentUnavailableError
from mixexport.specs import TensorSpec

Profile = tuple[int, int, int]
#: (min, opt, max) per symbolic axis name; see the module docstring for why these values.
DEFAULT_PROFILE: dict[str, Profile] = {
    "batch": (1, 256, 4096),
    "candidates": (1, 256, 4096),
    "users": (1, 1, 256),
    "seq": (1, 128, 1024),
}
_SHAPE_RE = re.compile(r"^(?P<name>[A-Za-z_]\w*):(?P<values>[^:]+)$")


def parse_shapes(specs: Iterable[str]) -> dict[str, Profile]:
    """``--shapes NAME:MIN,OPT,MAX`` (repeatable) → {axis: (min, opt, max)}.

    Raises :class:`BadInputError` for a malformed value, a non-positive size, MIN <= OPT <= MAX not
    holding, or an axis given twice.
    """
    out: dict[str, Profile] = {}
    for spec in specs:
        m = _SHAPE_RE.match(spec.strip())
        values = m.group("values").split(",") if m else []
        try:
            nums = tuple(int(v) for v in values)
        except ValueError:
            nums = ()
        if not m or len(nums) != 3:
            raise BadInputError(f"--shapes {spec!r}: expected NAME:MIN,OPT,MAX with three integers",
                                "e.g. --shapes candidates:1,256,4096")
        name = m.group("name")
        lo, opt, hi = nums
        if lo < 1:
            raise BadInputError(f"--shapes {spec!r}: sizes must be >= 1", "e.g. --shapes candidates:1,256,4096")
        if not lo <= opt <= hi:
            raise BadInputError(f"--shapes {spec!r}: need MIN <= OPT <= MAX, found {lo}, {opt}, {hi}",
                                "e.g. --shapes candidates:1,256,4096")
        if name in out:
            raise BadInputError(f"--shapes gives axis {name!r} twice", "give each axis once")
        out[name] = (lo, opt, hi)
    return out


def axis_profile(name: str, shapes: Mapping[str, Profile]) -> Profile:
    """The (min, opt, max) of one symbolic axis: ``--shapes`` first, then the defaults."""
    if name in shapes:
        return shapes[name]
    if name in DEFAULT_PROFILE:
        return DEFAULT_PROFILE[name]
    raise BadInputError(f"symbolic axis {name!r} has no default optimization profile",
                        f"give it one: --shapes {name}:MIN,OPT,MAX")


def derive_profile(inputs: Sequence[TensorSpec], shapes: Mapping[str, Profile]
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Per input: the (min, opt, max) shapes of one optimization profile. Static dims stay fixed;
    every symbolic dim takes its axis' profile, so inputs sharing an axis agree."""
    out = {}
    for spec in inputs:
        dims = [(d, d, d) if isinstance(d, int) else axis_profile(d, shapes) for d in spec.shape]
        out[spec.name] = tuple(tuple(int(d[i]) for d in dims) for i in range(3))
    return out  # type: ignore[return-value]


def check_shapes_apply(shapes: Mapping[str, Profile], segments: Iterable[Any]) -> None:
    """Every ``--shapes`` axis must be a symbolic axis of some segment input (catches typos)."""
    axes = {d for seg in segments for s in seg.inputs for d in s.shape if isinstance(d, str)}
    unknown = sorted(set(shapes) - axes)
    if unknown:
        raise BadInputError(f"--shapes names axes {unknown} that no segment input has; the bundle's "
                            f"symbolic axes are {sorted(axes)}", "use one of those names")


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

    def __init__(self, trt: Any, plan: bytes, segment: SegmentEntry, label: str, host_code: bool) -> None:
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


class TensorRTBackend:
    """``--target trt``: TensorRT >= 10 engines per segment, run on the current CUDA GPU."""

    name = "tensorrt"
    label = "TensorRT"
    modules: tuple[str, ...] = ("tensorrt",)
    extra = "trt"
    min_major = 10
    consumes = "onnx"
    #: BuildOptions fields this backend accepts (mixexport build --shapes / --version-compatible)
    BUILD_SETTINGS = ("shapes", "version_compatible")

    def __init__(self, device: str = "cuda", shapes: Mapping[str, Profile] | None = None,
                 version_compatible: bool = False) -> None:
        if device != "cuda":
            raise BadInputError(f"{self.label} engines run on CUDA GPUs only, not on {device}",
                                "pass --device cuda")
        self.device = device
        self.shapes = dict(shapes or {})
        self.version_compatible = bool(version_compatible)

    def _import(self) -> tuple[Any, str]:
        errors = []
        for module in self.modules:
            try:
                return importlib.import_module(module), ""
            except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError
                errors.append(f"{module}: {type(e).__name__}")
        return None, "; ".join(errors)

    def module(self) -> Any:
        """The imported library; raises (exit 3) when unavailable."""
        reason = self.unavailable_reason()
        if reason:
            raise EnvironmentUnavailableError(reason)
        return self._import()[0]

    def unavailable_reason(self) -> str | None:
        trt, why = self._import()
        install = f'pip install "mixexport[{self.extra}]"'
        if trt is None:
            return f"{self.label} (Python module {self.modules[0]}) is not installed ({why}): {install}"
        version = str(getattr(trt, "__version__", "0"))
        if int(re.match(r"\d*", version).group() or 0) < self.min_major:
            return f"{self.label} >= {self.min_major} is needed, found {version}: {install}"
        try:
            import torch
        except ImportError:
            return f"{self.label} sessions use torch CUDA tensors, but torch is not installed"
        if not torch.cuda.is_available():
            return f"{self.label} needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False)"
        return None

    def session_options(self) -> dict[str, Any]:
        return {"device": "cuda", "strongly_typed": True, "version_compatible": self.version_compatible,
                "profile": {k: list(v) for k, v in {**DEFAULT_PROFILE, **self.shapes}.items()}}

    def compile(self, bundle: Bundle, writer: BundleWriter, progress: Any) -> dict[str, dict[str, str]]:
        """Parse each segment's ONNX (as written in the bundle) and build its engine."""
        trt = self.module()
        check_shapes_apply(self.shapes, bundle.segments)
        arch = gpu_arch()
        cache_file = timing_cache_path(self.name, str(trt.__version__), arch)
        cache = cache_file.read_bytes() if cache_file.is_file() else b""
        entries = engine_entries([s.name for s in bundle.segments], self.name, arch)
        for seg in bundle.segments:
            progress(f"{self.label}: building the engine of segment {seg.name} for {arch}")
            plan, cache = build_engine(trt, writer.tmp / f"segments/{seg.name}.onnx", seg.inputs,
                                       self.shapes, cache, self.version_compatible, self.label)
            writer.path(entries[seg.name][self.name]).write_bytes(plan)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_bytes(cache)
        os.replace(tmp, cache_file)  # atomic: concurrent builds never read half a cache
        return entries

    def prepare(self, manifest: Manifest, segment: SegmentEntry, workdir: Path | None = None) -> TrtSession:
        rel = segment.engines.get(self.name)
        if not rel:
            raise BadInputError(f"segment {segment.name!r} has no {self.label} engine (bundle target "
                                f"{manifest.data.get('target')!r})", "rebuild with the matching --target")
        trt = self.module()
        here = gpu_arch()
        if not rel.endswith(f".{here}.plan"):
            raise EnvironmentUnavailableError(f"{rel} was built for another GPU architecture than this one ({here})",
                                              "rebuild the bundle on this GPU")
        host_code = bool(segment.session_options.get("version_compatible"))
        return TrtSession(trt, manifest.file(rel).read_bytes(), segment, self.label, host_code)

    def describe(self) -> dict[str, Any]:
        trt = self.module()
        return {"backend": self.name, "device": "cuda", "version": str(trt.__version__), "arch": gpu_arch(),
                **self.session_options()}


class TensorRTRtxBackend(TensorRTBackend):
    """``--target trt-rtx``: TensorRT for RTX (same API; runs on compute capability 8.0, 8.6, 8.9 and
    12.x — on an H100 it parses and builds but refuses to run)."""

    name = "tensorrt-rtx"
    label = "TensorRT-RTX"
    modules = ("tensorrt_rtx_bindings", "tensorrt_rtx")
    extra = "trt-rtx"
    min_major = 1


def build_engine(trt: Any, onnx_path: Path, inputs: Sequence[TensorSpec], shapes: Mapping[str, Profile],
                 timing_cache: bytes, version_compatible: bool, label: str) -> tuple[bytes, bytes]:
    """Parse ``onnx_path`` (external data beside it is found by the parser) into a strongly typed
    network, add one optimization profile from ``inputs``' specs, and build.

    Returns the serialized plan and the updated timing cache.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no parser message"]
        raise BadInputError(f"{label} cannot parse {onnx_path.name}: {errors[0]}"
                            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                            "the graph uses an operator or pattern this parser does not support")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    wanted = derive_profile(inputs, shapes)
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in wanted:
            raise BadInputError(f"network input {name!r} of {onnx_path.name} is not in the manifest's specs",
                                "rebuild the bundle")
        profile.set_shape(name, *wanted[name])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)  # False: a cache from another version/GPU is an error
    if version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if flag is None:
            raise BadInputError(f"--version-compatible is not supported by {label}", "drop --version-compatible")
        config.set_flag(flag)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BadInputError(f"{label} could not build an engine from {onnx_path.name} (see its log above)",
                            "check the optimization profile (--shapes) and the graph's ops")
    return bytes(plan), bytes(config.get_timing_cache().serialize())

"""AOTInductor backend (``--target aoti``): every segment's ``torch.export`` program compiled ahead of
time into ``engines/<segment>.aoti.<arch>.pt2`` — ``arch`` is ``cpu-<machine>`` (``cpu-x86_64``) or
the GPU's ``sm<major><minor>`` — loadable from Python (:func:`torch._inductor.aoti_load_package`) and
from C++ (``torch::inductor::AOTIModelPackageLoader``, see ``examples/cpp/``).

What the package sees: the program after program-stage passes and ``--precision`` (the cast
happens on the program). ONNX-stage passes (``quantize-w8a16``…) rewrite the ONNX graph only, so
they cannot reach an AOTI package: the build refuses that combination rather than ship a package
that silently lacks them. The program's dynamic axes (batch / users / candidates) stay dynamic.

Each package carries metadata (``get_metadata()`` in Python and C++): ``mixexport.inputs`` and
``mixexport.outputs``, the comma-separated tensor names in the package's flat argument order, so a
C++ server can feed tensors by name without parsing the pytree call spec.

A package runs only on the device kind and GPU architecture it was compiled for; ``prepare``
refuses a mismatch with the fix (``--device``, or rebuild on this machine).
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mixexport.backends.base import SessionBase
from mixexport.bundle import Bundle, BundleWriter, Manifest, SegmentEntry
from mixexport.checked_load import CheckedFile, private_copy, read_checked
from mixexport.errors import BadInputError, EnvironmentUnavailableError
from mixexport.specs import TensorSpec

INPUTS_KEY, OUTPUTS_KEY = "mixexport.inputs", "mixexport.outputs"


def aoti_arch(device: str) -> str:
    """``cpu-x86_64`` / ``cpu-aarch64`` on CPU, ``sm90`` etc. on CUDA (the current GPU)."""
    if device == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability()
        return f"sm{major}{minor}"
    return f"cpu-{platform.machine().lower()}"


def engine_path(segment: str, device: str) -> str:
    """Where a segment's package lives inside the bundle."""
    return f"engines/{segment}.aoti.{aoti_arch(device)}.pt2"


def program_io_names(program: Any) -> tuple[list[str], list[str]]:
    """The program's user input names in flat call order, and its user output names."""
    from torch.export.graph_signature import InputKind

    ins = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    return ins, list(program.graph_signature.user_outputs)


def compile_program(program: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                    path: Path, device: str) -> Path:
    """AOTInductor-compile ``program`` for ``device`` into the package ``path``.

    The package's metadata records the input/output names in flat order (see the module docstring).
    """
    import torch

    in_names, _ = program_io_names(program)
    spec_names = [s.name for s in inputs]
    if sorted(in_names) != sorted(spec_names):
        raise BadInputError(f"the program's inputs {in_names} differ from the segment's {spec_names}",
                            "report this as a bug: a pass changed the program's signature")
    if device == "cuda":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, "cuda")  # exported on CPU; weights/kernels for the GPU
    metadata = {INPUTS_KEY: ",".join(in_names), OUTPUTS_KEY: ",".join(s.name for s in outputs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False):  # compilation must not run under an outer inference_mode
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.metadata": metadata})
    return path


def _torch_dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise BadInputError(f"unknown tensor dtype {name!r} in the manifest", "rebuild the bundle")
    return dtype


class AotiSession(SessionBase):
    """One loaded AOTI package; numpy in, numpy out (bf16 outputs come back as float32, since
    numpy has no bfloat16; inputs are cast back to the spec's dtype on the way in)."""

    def __init__(self, package: Path | CheckedFile, segment: SegmentEntry, device: str) -> None:
        import torch

        self.device = torch.device(device)
        if isinstance(package, CheckedFile):
            # the loader takes a path only: a private copy of the checked bytes (mixexport.checked_load)
            with private_copy(package.data, "package.pt2") as copy:
                self.model = torch._inductor.aoti_load_package(str(copy))
            path: Path | str = package.rel
        else:
            path = package
            self.model = torch._inductor.aoti_load_package(str(path))
        meta = self.model.get_metadata()
        self.input_names = [n for n in meta.get(INPUTS_KEY, "").split(",") if n]
        self.output_names = [n for n in meta.get(OUTPUTS_KEY, "").split(",") if n]
        expected = sorted(s.name for s in segment.inputs)
        if sorted(self.input_names) != expected or self.output_names != [s.name for s in segment.outputs]:
            raise BadInputError(f"{path} does not match segment {segment.name!r} of the manifest (inputs "
                                f"{self.input_names} vs {expected})", "rebuild the bundle")
        self.dtypes = {s.name: _torch_dtype(s.dtype) for s in segment.inputs}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        self._check_open()
        with torch.inference_mode():
            args = {}
            for name in self.input_names:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
                args[name] = t.to(device=self.device, dtype=self.dtypes[name])
            out = self.model(**args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {name: _to_numpy(o) for name, o in zip(self.output_names, outs)}

    def close(self) -> None:
        """Release the loaded package (its compiled library and weights)."""
        self.model = None
        super().close()


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


class AotiBackend:
    """``--target aoti``: AOTInductor packages of the segments' programs, CPU or CUDA."""

    name = "aoti"
    #: ``prepare`` takes the checked bytes (:func:`mixexport.checked_load.open_sessions`)
    loads_checked = True
    #: the artifact is compiled from the torch.export program, not from the ONNX graph
    consumes = "program"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def unavailable_reason(self) -> str | None:
        try:
            import torch
        except ImportError:
            return "AOTInductor needs torch: pip install torch"
        if self.device == "cuda":
            if not torch.cuda.is_available():
                return (f"--device cuda: no usable CUDA GPU for AOTInductor here (torch {torch.__version__}, "
                        f"built for CUDA {torch.version.cuda or 'none'})")
            return None
        if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
            return "AOTInductor on CPU compiles C++, but no C++ compiler (g++, c++, clang++) is on PATH"
        return None

    def session_options(self) -> dict[str, Any]:
        return {"device": self.device}

    def compile(self, bundle: Bundle, writer: BundleWriter, progress: Any) -> dict[str, dict[str, str]]:
        """One package per segment, from the segment's program."""
        refuse_onnx_stage_passes([p.name for p in bundle.passes], "aoti")
        out: dict[str, dict[str, str]] = {}
        for seg in bundle.segments:
            if seg.program is None:
                raise BadInputError(f"segment {seg.name!r} has no torch.export program to compile",
                                    "--target aoti needs the program stage; report this as a bug")
            rel = engine_path(seg.name, self.device)
            progress(f"AOTInductor compile of segment {seg.name} for {aoti_arch(self.device)} (tens of seconds)")
            compile_program(seg.program, seg.inputs, seg.outputs, writer.path(rel), self.device)
            out[seg.name] = {self.name: rel}
        return out

    def prepare(self, manifest: Manifest, segment: SegmentEntry, workdir: Path | None = None,
                checked: CheckedFile | None = None) -> AotiSession:
        """Load ``segment``'s package from the bytes that were checked: ``checked`` (read by
        :func:`~mixexport.checked_load.open_sessions`), else read and checked here."""
        rel = segment.engines.get(self.name)
        if not rel:
            raise BadInputError(f"segment {segment.name!r} has no AOTI package (bundle target "
                                f"{manifest.data.get('target')!r})",
                                "rebuild with --target aoti, or run it with --backend onnxruntime")
        built = str(segment.session_options.get("device") or ("cuda" if ".sm" in rel else "cpu"))
        if built != self.device:
            raise BadInputError(f"{rel} was compiled for {built}, not {self.device}",
                                f"run with --device {built}, or rebuild with --device {self.device}")
        here = aoti_arch(self.device)
        if f".aoti.{here}." not in rel:
            raise EnvironmentUnavailableError(f"{rel} was compiled for another architecture than this "
                                              f"machine's ({here})", "rebuild the bundle on this machine")
        if checked is None:
            checked = read_checked(manifest.root, manifest.data["files"], rel)
        return AotiSession(checked, segment, self.device)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "device": self.device, "torch": torch.__version__,
                "arch": aoti_arch(self.device)}


def refuse_onnx_stage_passes(passes: list[str], target: str) -> None:
    """Raise if any of ``passes`` (names) rewrites the ONNX graph only: a package compiled from the
    program would silently lack it. The build calls this before any work, ``compile`` again."""
    from mixexport.passes.order import pass_by_name  # the pass table, not the pipeline: no import circle

    late = [name for name in passes if pass_by_name(name).stage == "onnx"]
    if late:
        raise BadInputError(f"--target {target} compiles the torch.export program, which the ONNX-stage "
                            f"passes {late} do not change",
                            "drop those passes for this target, or build --target onnx/trt to apply them")

"""ONNX Runtime backend: CPU, or CUDA when onnxruntime-gpu is installed (``--device cuda``).

Session options are part of the bundle (``segments[].session_options`` in the manifest) so that
verify, bench and a server all run the graph the same way. The defaults keep the parity reference
exact:

- ``QDQSelectorActionTransformer`` is disabled: ORT would otherwise rewrite a W8A16
  ``DequantizeLinear → MatMul`` on 2-D ``[K,N]`` weights into ``MatMulNBits`` (by default with int8
  *activations*, i.e. W8A8) — the int8 survival check in ``verify`` proves the form is kept;
- ``session.qdq_matmulnbits_accuracy_level=0`` pins float activations should any MatMulNBits remain;
- ``session.intra_op.allow_spinning=0``: a bundle runs several sessions (user, cache, item
  segments) in one process, each with its own thread pool; spinning threads of the session that
  just ran steal the cores from the next (ugsep base, N=256: user+item 78 ms spinning, 52 ms not;
  the item segment alone 50 vs 51 ms);
- ``SkipLayerNormFusion`` is disabled on CPU, where the fused kernel is slower than
  LayerNormalization + Add for our token widths (rankmixer base, 256 rows: 67 vs 76 ms measured).

Note: ORT separates the names in ``optimization.disable_specified_optimizers`` with ``;``.

Which ONNX Runtime: the ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` wheels install the same
``onnxruntime`` module, so with both installed whichever landed last wins. mixexport's extras pick
exactly one (``mixexport[cpu]`` or ``mixexport[gpu]``); :func:`ort_build` says which build and
providers are active (``mixexport inspect``, ``bench``/``verify --device cuda``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mixexport.backends.base import SessionBase
from mixexport.bundle import Manifest, SegmentEntry
from mixexport.checked_load import CheckedOnnx, read_checked_onnx
from mixexport.errors import BadInputError, EnvironmentUnavailableError, MixexportError
from mixexport.manifest_check import interface_mismatch

#: The wheels that install the ``onnxruntime`` module (one at a time).
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
INSTALL_HINT = ('pip install "mixexport[cpu]" (CPU) or "mixexport[gpu]" (CUDA), not both: '
                "the two wheels install the same module")
DEFAULT_OPTIONS: dict[str, Any] = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "config": {"session.qdq_matmulnbits_accuracy_level": "0", "session.intra_op.allow_spinning": "0",
               "optimization.disable_specified_optimizers": "SkipLayerNormFusion;QDQSelectorActionTransformer"},
}


class OrtSession(SessionBase):
    """One ``InferenceSession``. ``external``: the model's external-data files by ``location``
    string, handed over from memory (a model given as bytes then opens no file; see
    :mod:`mixexport.checked_load`)."""

    def __init__(self, path: Path | bytes, options: Mapping[str, Any], device: str,
                 external: Mapping[str, bytes | bytearray] | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if external:
            if not hasattr(so, "add_external_initializers_from_files_in_memory"):
                raise EnvironmentUnavailableError(
                    f"ONNX Runtime {ort.__version__} cannot take external data from memory (its Python API "
                    "lacks SessionOptions.add_external_initializers_from_files_in_memory), and mixexport loads "
                    "only the bytes it checked", "upgrade ONNX Runtime: pip install -U onnxruntime")
            names = list(external)
            so.add_external_initializers_from_files_in_memory(names, [external[n] for n in names],
                                                              [len(external[n]) for n in names])
        # a model given as bytes would read any external tensor not handed over from memory relative
        # to the working directory: point that at an empty directory, so such a read fails instead
        no_files = tempfile.mkdtemp(prefix="mixexport-ort-") if external is not None else None
        if no_files is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", no_files)
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, options["graph_optimization_level"])
        for key, value in options.get("config", {}).items():
            so.add_session_config_entry(key, str(value))
        if options.get("intra_op_num_threads"):
            so.intra_op_num_threads = int(options["intra_op_num_threads"])
        if options.get("optimized_model_path"):
            so.optimized_model_filepath = str(options["optimized_model_path"])
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        model = path if isinstance(path, bytes) else str(path)
        try:
            self.session = ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors
            if "NOT_IMPLEMENTED" not in str(e):
                raise
            # e.g. bf16 graphs on the CPU provider (no bf16 Mul kernel): this machine cannot run it
            first = str(e).strip().splitlines()[0]
            raise EnvironmentUnavailableError(
                f"ONNX Runtime ({providers[0]}) has no kernel for an op of this graph: {first[:240]}",
                "the CPU provider lacks most bfloat16 kernels: for --precision bf16 use --device cuda "
                "(onnxruntime-gpu) or --target aoti") from None
        finally:
            if no_files is not None:
                os.rmdir(no_files)
        if no_files is not None:
            # ORT's Python wrapper keeps the model bytes for the rest of the session only to rebuild it
            # on a provider fallback (its own comment calls that holding the memory indefinitely):
            # without the fallback, an inline model's weights are not held twice (a bundle segment
            # that cannot run on its provider then fails instead of silently moving to the CPU)
            self.session.disable_fallback()
            self.session._model_bytes = None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))

    def close(self) -> None:
        """Release the ``InferenceSession`` (its graph, weights, arena and thread pool)."""
        self.session = None
        super().close()


class OnnxRuntimeBackend:
    name = "onnxruntime"
    #: ``prepare`` takes the checked bytes (:func:`mixexport.checked_load.open_sessions`)
    loads_checked = True

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def unavailable_reason(self) -> str | None:
        build = ort_build()
        if build["version"] is None:
            return f"onnxruntime is not installed: {INSTALL_HINT}"
        if self.device == "cuda" and "CUDAExecutionProvider" not in build["providers"]:
            fix = 'pip install "mixexport[gpu]"'
            if "onnxruntime" in build["distributions"]:  # the CPU wheel's module would shadow the GPU one
                fix = f"pip uninstall -y {' '.join(build['distributions'])} && {fix}"
            return (f"onnxruntime has no CUDA execution provider here (needs the onnxruntime-gpu wheel alone, "
                    f"and a GPU); active: {describe_ort_build(build)}: {fix}")
        return None

    def session_options(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_OPTIONS.items()}

    def compile(self, bundle: Any, writer: Any, progress: Any) -> dict[str, dict[str, str]]:
        """Nothing beyond the ONNX segments: ONNX Runtime loads them directly."""
        return {}

    def open_file(self, path: Path, options: Mapping[str, Any] | None = None) -> OrtSession:
        reason = self.unavailable_reason()
        if reason:
            raise EnvironmentUnavailableError(reason)
        return OrtSession(path, options or self.session_options(), self.device)

    def open_bytes(self, model: bytes, options: Mapping[str, Any] | None = None,
                   external: Mapping[str, bytes | bytearray] | None = None) -> OrtSession:
        """A session on an in-memory model (the build's stage ledger, a checked bundle segment) and
        its external data by location; same options as files."""
        return OrtSession(model, options or self.session_options(), self.device, external)

    def prepare(self, manifest: Manifest, segment: SegmentEntry, workdir: Path | None = None,
                checked: CheckedOnnx | None = None) -> OrtSession:
        """A session on ``segment``'s ONNX file and external data, from the bytes that were checked:
        ``checked`` (read by the caller, :func:`~mixexport.checked_load.open_sessions`), else read and
        checked here. ONNX Runtime gets those bytes, never a path."""
        reason = self.unavailable_reason()
        if reason:
            raise EnvironmentUnavailableError(reason)
        if checked is None:
            checked = read_checked_onnx(manifest.root, manifest.data["files"], segment.file)
        # a segment built for another backend (aoti, tensorrt) records that backend's options
        options = segment.session_options if segment.backend == self.name else None
        external = {loc: f.data for loc, f in checked.external.items()}
        try:
            session = self.open_bytes(checked.model, options or self.session_options(), external)
        except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors; ours pass through
            if isinstance(e, MixexportError):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BadInputError(f"ONNX Runtime cannot load segment {segment.name!r} ({segment.file}): {first[:300]}",
                                "rebuild the bundle, or fetch it again from where it was published") from None
        finally:
            del checked, external  # ORT copied what it needs: the checked bytes can go
        declared = [(a.name, a.type, a.shape) for a in session.session.get_inputs()], \
            [(a.name, a.type, a.shape) for a in session.session.get_outputs()]
        problem = (interface_mismatch(segment.inputs, declared[0], "inputs")
                   or interface_mismatch(segment.outputs, declared[1], "outputs"))
        if problem:  # the runtime feeds and cuts tensors by the manifest's specs: they must be the file's
            session.close()
            raise BadInputError(f"segment {segment.name!r} of the manifest does not describe {segment.file}: "
                                f"{problem}", "rebuild the bundle, or fetch it again from where it was published")
        return session

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.name, "device": self.device, "onnxruntime": ort.__version__,
                "providers": ort.get_available_providers(), "session_options": self.session_options(),
                "build": ort_build()}


def ort_build() -> dict[str, Any]:
    """The ONNX Runtime active here: the installed wheels that provide the module
    (``distributions``: name → version), the module's ``version`` and available ``providers`` (None
    and [] when it does not import), and ``conflict`` when more than one of those wheels is
    installed (they overwrite each other's files: whichever landed last is what runs)."""
    from importlib import metadata

    dists = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            dists[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort
    except ImportError:
        return {"distributions": dists, "version": None, "providers": [], "conflict": len(dists) > 1}
    return {"distributions": dists, "version": ort.__version__, "providers": list(ort.get_available_providers()),
            "conflict": len(dists) > 1}


def describe_ort_build(build: Mapping[str, Any] | None = None) -> str:
    """One line: ``ONNX Runtime 1.23.2 (wheel onnxruntime-gpu 1.23.2), providers CUDA, CPU`` and, when
    both wheels are installed, what to do about it."""
    build = build or ort_build()
    if build["version"] is None:
        return f"ONNX Runtime: not installed ({INSTALL_HINT})"
    wheels = ", ".join(f"{k} {v}" for k, v in build["distributions"].items()) or "no wheel metadata"
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in build["providers"]) or "none"
    line = f"ONNX Runtime {build['version']} (wheel {wheels}), providers {providers}"
    if build["conflict"]:
        line += ("; both onnxruntime and onnxruntime-gpu are installed and share one module: "
                 "pip uninstall -y onnxruntime onnxruntime-gpu, then install one")
    return line

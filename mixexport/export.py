"""torch.export program → ONNX (dynamo exporter, opset 21), and ONNX files on disk.

Symbolic dims get the names of our specs (``batch``, ``users``, ``candidates``…) instead of the
exporter's ``s37``; initializers go to one external ``.onnx.data`` file when the weights pass
``external_threshold`` bytes (default just under protobuf's 2 GB limit); every saved file passes
``onnx.checker`` with ``full_check``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch

from mixexport.errors import BadInputError
from mixexport.specs import TensorSpec

OPSET = 21
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB, less room for the graph itself
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT
log = logging.getLogger(__name__)


def to_onnx(program: torch.export.ExportedProgram, inputs: tuple[TensorSpec, ...],
            outputs: tuple[TensorSpec, ...], example: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Export ``program`` with the dynamo exporter; inputs/outputs/dims named after the specs."""
    kwargs = {s.name: torch.from_numpy(np.ascontiguousarray(example[s.name])) for s in inputs}
    sink = io.StringIO()  # the exporter prints progress lines to stdout; keep stdout for results
    # torchvision is not a dependency: its "Skipping torchvision::nms" notices are noise here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            onnx_program = torch.onnx.export(program, (), kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                             output_names=[s.name for s in outputs], optimize=True,
                                             verbose=False, report=False)
            model = onnx_program.model_proto
    except Exception as e:  # noqa: BLE001 - one line with the exporter's reason
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"ONNX export failed: {first[:300]}",
                            "the model uses an operator the dynamo ONNX exporter cannot translate") from None
    log.debug("exporter output: %s", sink.getvalue())
    _name_dims(model, inputs, outputs)
    _cast_outputs_to_spec(model, outputs)
    return model


def _cast_outputs_to_spec(model: onnx.ModelProto, outputs: tuple[TensorSpec, ...]) -> None:
    """Give every graph output its spec's dtype. The exporter can leave a half-precision reduction's
    result in float32 (``aten.sum`` on fp16 becomes Cast-to-float → ReduceSum with no cast back), so
    a segment boundary would change dtype between the user and the item segment."""
    from onnx import helper

    by_name = {vi.name: vi for vi in model.graph.output}
    for spec in outputs:
        vi = by_name.get(spec.name)
        want = (onnx.TensorProto.BFLOAT16 if spec.dtype == "bfloat16"
                else helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)))
        if vi is None or vi.type.tensor_type.elem_type in (0, want):
            continue
        if not any(spec.name in node.output for node in model.graph.node):
            continue  # an output that is a graph input or initializer as-is: nothing to re-type
        raw = f"{spec.name}__before_cast"
        for node in model.graph.node:
            node.output[:] = [raw if o == spec.name else o for o in node.output]
            node.input[:] = [raw if i == spec.name else i for i in node.input]
        model.graph.node.append(helper.make_node("Cast", [raw], [spec.name], to=want, name=f"{spec.name}__cast"))
        vi.type.tensor_type.elem_type = want


def _name_dims(model: onnx.ModelProto, inputs: tuple[TensorSpec, ...],
               outputs: tuple[TensorSpec, ...]) -> None:
    rename: dict[str, str] = {}
    graph_io = {vi.name: vi for vi in list(model.graph.input) + list(model.graph.output)}
    for spec in inputs:
        vi = graph_io.get(spec.name)
        if vi is None:
            raise BadInputError(f"exported ONNX has no input {spec.name!r}; found "
                                f"{[i.name for i in model.graph.input]}", "report this as a bug")
        for want, dim in zip(spec.shape, vi.type.tensor_type.shape.dim):
            if isinstance(want, str) and dim.dim_param:
                rename.setdefault(dim.dim_param, want)
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    for spec in outputs:  # outputs whose leading dim is an expression still get the spec's name
        vi = graph_io.get(spec.name)
        if vi is not None:
            for want, dim in zip(spec.shape, vi.type.tensor_type.shape.dim):
                if isinstance(want, str) and dim.dim_param and dim.dim_param not in rename.values():
                    dim.dim_param = want


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers (raw data, typed fields, or external data files)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def fits_protobuf(model: onnx.ModelProto, limit: int = PROTOBUF_LIMIT) -> bool:
    """Whether ``model`` can be serialized in one piece: protobuf refuses messages past 2 GB (with
    64 MiB left for the graph itself)."""
    return weight_bytes(model) < limit


def save_onnx(model: onnx.ModelProto, path: Path, external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Save and fully check ``model``; returns the files written (``.onnx`` and maybe ``.onnx.data``)."""
    path = Path(path)
    files = [path]
    if weight_bytes(model) > external_threshold:
        # saving with external data rewrites the proto in place: work on a copy when one fits in
        # protobuf's 2 GB (always, except for the genuinely huge models that need this path)
        if fits_protobuf(model):
            model = onnx.ModelProto.FromString(model.SerializeToString())
        data_name = path.name + ".data"
        # small tensors (shapes, axes) stay inline so shape inference can read them
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        files.append(path.with_name(data_name))
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(os.fspath(path), full_check=True)
    return files


def load_onnx(path: Path, with_weights: bool = True) -> onnx.ModelProto:
    return onnx.load_model(os.fspath(path), load_external_data=with_weights)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for node in model.graph.node:
        hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return dict(sorted(hist.items()))

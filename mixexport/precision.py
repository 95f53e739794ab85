"""``--precision``: run a model's float weights and compute in fp16 or bf16, keeping its interface.

The cast works on the ``torch.export`` program (so it applies alike to reference families and to a
user's own ``.pt2``), right after export and before any pass:

- every floating parameter, buffer and constant becomes the target dtype;
- every ``torch.float32`` argument of a graph op (``x.to(torch.float32)``, ``full(dtype=…)``,
  metadata asserts) becomes the target dtype, so no op silently promotes back to fp32;
- float32 graph inputs are cast to the target dtype as the first op, and outputs that were float32
  are cast back as the last op.

The bundle's interface is therefore unchanged: float inputs and outputs stay ``float32`` (a server
need not know the precision), integer ids stay integers. Tensors *between* segments (user state of a
split bundle) are in the target dtype. The manifest records ``precision``, and verify picks the
per-precision tolerances of :mod:`mixexport.verification.compare`.

Runtime support on CPU (measured on the tiny rankmixer, onnxruntime 1.32): fp16 ONNX runs in ONNX
Runtime's CPU provider; bf16 ONNX does not (no CPU kernel for bf16 ``Mul``), so bf16 bundles need
the CUDA provider or ``--target aoti``; AOTInductor runs both on CPU.

``int8`` and ``w8a16`` are of another kind: the program stays float32 and the build adds an ONNX
pass. ``int8`` adds ``quantize-int8`` (int8 weights and activations, integer GEMMs:
:mod:`mixexport.passes.quantize_int8`), so it needs an ONNX Runtime target on CPU; ``w8a16`` adds
``quantize-w8a16`` (int8 weights, float activations), which runs on every ONNX target (onnx, trt,
trt-rtx). The pass sets the bundle's precision. The passes stay available on their own for
composition (``--precision fp16 --passes quantize-w8a16``: fp16 activations, int8 weights); asking for
both quantizations at once is refused (:func:`check_precision_passes`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import numpy as np

from mixexport.bundle import Bundle
from mixexport.errors import BadInputError

PRECISIONS = ("fp32", "fp16", "bf16", "w8a16", "int8")
#: Precisions reached by an ONNX pass rather than by casting the program: ``int8`` keeps the
#: program float32 and adds ``quantize-int8`` (integer GEMMs on ONNX Runtime CPU), ``w8a16`` adds
#: ``quantize-w8a16`` (int8 weights dequantized in the graph: every ONNX target).
PASS_PRECISIONS = {"int8": "quantize-int8", "w8a16": "quantize-w8a16"}
#: Pass precisions whose kernels only ONNX Runtime on CPU runs (integer GEMMs).
ORT_CPU_PRECISIONS = ("int8",)


def check_precision_passes(precision: str, passes: tuple[str, ...]) -> None:
    """Refuse ``--precision`` together with a quantization pass that contradicts it: int8 weights
    and activations and W8A16 (int8 weights, float activations) are two answers to one question."""
    quantize = [p for p in passes if p in PASS_PRECISIONS.values()]
    wanted = PASS_PRECISIONS.get(precision)
    other = [p for p in quantize if p != wanted]
    if len(set(quantize)) > 1 or (wanted and other):
        both = sorted(set(quantize) | ({wanted} if wanted else set()))
        raise BadInputError(f"--precision {precision} with --passes {','.join(quantize)}: {' and '.join(both)} "
                            "each quantize the weights, only one can", "give --precision int8 or --precision "
                            "w8a16 (each adds its pass), not both quantizations")


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a ``--precision`` value."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "w8a16": torch.float32,
             "int8": torch.float32}
    try:
        return table[precision]
    except KeyError:
        raise BadInputError(f"unknown --precision {precision!r}; known: {', '.join(PRECISIONS)}",
                            "e.g. --precision bf16") from None


def cast_program(program: Any, precision: str, example: Mapping[str, np.ndarray],
                 dynamic: Mapping[str, Any]) -> Any:
    """A new ``ExportedProgram`` computing ``program`` in ``precision`` (see the module docstring).

    ``example`` holds valid inputs by name (the re-export traces with them) and ``dynamic`` the
    ``torch.export`` dynamic shapes of the inputs. ``program`` itself is not modified.
    """
    import torch
    from torch.fx.node import map_aggregate

    dtype = torch_dtype(precision)
    # deepcopy: module() shares parameter objects with the program, and .to() rewrites them in place
    gm = copy.deepcopy(program.module())
    gm.to(dtype)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "get_attr":
            value = getattr(gm, str(node.target), None)
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                setattr(gm, str(node.target), value.to(dtype))  # a constant that .to() does not visit
        elif node.op == "placeholder" and _dtype(node) == torch.float32:
            with graph.inserting_after(node):
                cast = graph.call_function(torch.ops.aten.to.dtype, (node, dtype))
            node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        elif node.op == "call_function":
            node.args = map_aggregate(node.args, lambda a: dtype if a is torch.float32 else a)
            node.kwargs = map_aggregate(node.kwargs, lambda a: dtype if a is torch.float32 else a)
            if node.target in _fp32_only(precision):
                _run_in_fp32(graph, node, dtype)
        elif node.op == "output":
            with graph.inserting_before(node):
                node.args = map_aggregate(node.args, lambda a: _cast_back(graph, a, torch.float32))
    graph.lint()
    gm.recompile()
    feeds = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in example.items()}
    try:
        return torch.export.export(gm, (), kwargs=feeds, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types; report its reason in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"--precision {precision}: re-exporting the cast program failed: {first[:300]}",
                            "build with --precision fp32, or report the model") from None


def _fp32_only(precision: str) -> tuple[Any, ...]:
    """Ops that keep fp32 inputs at this precision: ONNX TopK (opset 21) has no bfloat16 type, so a
    bf16 TopK would make the exported graph invalid (the values are cast back; indices are exact)."""
    import torch

    return (torch.ops.aten.topk.default,) if precision == "bf16" else ()


def _run_in_fp32(graph: Any, node: Any, dtype: Any) -> None:
    import operator

    import torch

    with graph.inserting_before(node):
        up = graph.call_function(torch.ops.aten.to.dtype, (node.args[0], torch.float32))
    node.args = (up, *node.args[1:])
    for user in list(node.users):
        if user.target is operator.getitem and user.args[1] == 0:  # the values; [1] are the indices
            with graph.inserting_after(user):
                down = graph.call_function(torch.ops.aten.to.dtype, (user, dtype))
            user.replace_all_uses_with(down, delete_user_cb=lambda u: u is not down)


def _dtype(node: Any) -> Any:
    val = node.meta.get("val")
    return getattr(val, "dtype", None)


def _cast_back(graph: Any, arg: Any, dtype: Any) -> Any:
    """An output that was float32 before the cast gets a cast back to float32."""
    import torch

    if isinstance(arg, torch.fx.Node) and _dtype(arg) == torch.float32:
        return graph.call_function(torch.ops.aten.to.dtype, (arg, dtype))
    return arg


def cast_bundle(bundle: Bundle, precision: str, by_hint: bool = False) -> Bundle:
    """The program-stage bundle with every segment's program cast to ``precision``.

    Runs before any pass (the bundle must be at the program stage). ``fp32`` returns the bundle as
    it is, and so do ``int8`` and ``w8a16`` (their passes quantize the float32 ONNX). Example
    inputs for the re-export come from the source (valid ids, batch 5). ``by_hint``: the target
    compiles the float32 graph at ``precision`` itself (OpenVINO: ``INFERENCE_PRECISION_HINT`` for
    bf16, NNCF quantization for int8), so the program stays float32, no pass is added, and only the
    bundle's precision (its tolerances and gates) is set.
    """
    if by_hint:  # fp32 too: the bundle's precision is what the target compiles at
        torch_dtype(precision)
        return bundle.replace(precision=precision)
    if precision in ("fp32", *PASS_PRECISIONS):
        return bundle
    torch_dtype(precision)  # unknown names fail before any work
    if bundle.stage != "program":
        raise BadInputError(f"--precision is applied at export, but the bundle is at the {bundle.stage} stage",
                            "cast before the ONNX export")
    from mixexport.partition import dim_minimums, input_dim_names
    from mixexport.source import EXAMPLE_BATCH, dynamic_shapes

    rows = bundle.source.example_feeds(EXAMPLE_BATCH, seed=1234)
    multiples = bundle.source.multiples
    segments = []
    for seg in bundle.segments:
        if seg.role != "full":
            raise BadInputError(f"--precision casts the exported model before passes split it; found a "
                                f"{seg.role} segment", "cast before split-user-item")
        example = {s.name: rows[s.name] for s in seg.inputs}
        minimums = dim_minimums(seg.program, input_dim_names(seg.program, seg.inputs, multiples))
        minimums = {**bundle.source.minimums, **minimums}
        dynamic = dynamic_shapes(seg.inputs, multiples, minimums, bundle.source.maximums)
        program = cast_program(seg.program, precision, example, dynamic)
        segments.append(dataclasses.replace(seg, program=program))
    return bundle.replace(segments=tuple(segments), precision=precision)

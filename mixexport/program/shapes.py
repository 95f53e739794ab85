"""Symbolic dims of a user's program, with the ranges it was exported with.

A ``.pt2`` exported with ``dynamic_shapes={"seq_hist": {0: Dim("batch"), 1: Dim("seq", min=2, max=200)}}``
keeps its symbols (``s0``, ``s82``) and their ranges (``range_constraints``) but not the Dim names. We
name them the way reference families do, so a user's program and a checkpoint model share one path
through re-export, ONNX named dims, TensorRT profiles and Triton (``-1``):

- the leading axis of every input is ``batch`` (one row per (user, item) pair), also where the
  program gave inputs separate batch Dims;
- other symbols on inputs with role ``sequence`` are ``seq`` (the first), ``seq_2``, ``seq_3``…;
- any other symbol is ``<input>_<axis>`` of the first input that carries it;
- an axis that is an expression of symbols (``s82 + 1``, ``2*s82``) keeps the expression, written in
  those names (``seq + 1``), as checkpoint models' specs do.

The ranges become ``minimums`` and ``maximums`` by name (only finite bounds; a lower bound of 0 or 1 is
no constraint for a serving axis). Re-export (``source.dynamic_shapes``) passes both to ``Dim``, so the
program is re-exported with the axis it had, instead of the axis being dropped and the re-export
failing on the program's own range checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from mixexport.errors import BadInputError
from mixexport.specs import Dim

if TYPE_CHECKING:  # torch is imported where a graph is read: serving a bundle never needs it
    import torch

#: the size a named non-batch axis takes in example inputs when nothing asks for another: inside its
#: range, not 0/1 (torch.export specialises those), and different from EXAMPLE_BATCH (5)
EXAMPLE_SIZE = 7
#: an upper bound this large is no bound (torch writes sys.maxsize - 1 for some unbounded Dims)
UNBOUNDED = 2**31


@dataclass(frozen=True)
class ProgramDims:
    """Per program input its shape with named dims, and the ranges of those names."""

    shapes: dict[str, tuple[Dim, ...]]
    symbols: dict[Any, str] = field(default_factory=dict)  # sympy symbol -> dim name
    minimums: dict[str, int] = field(default_factory=dict)
    maximums: dict[str, int] = field(default_factory=dict)


def program_dims(ep: torch.export.ExportedProgram, inputs: Sequence[str], roles: Mapping[str, str]) -> ProgramDims:
    """Name every symbol of ``ep``'s inputs (module docstring) and read its range."""
    import torch

    import sympy

    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    names: dict[sympy.Symbol, str] = {}
    sequences = 0
    for name in inputs:
        for axis, d in enumerate(placeholders[name].meta["val"].shape):
            expr = d.node.expr if isinstance(d, torch.SymInt) else None
            if not isinstance(expr, sympy.Symbol) or expr in names:
                continue
            if axis == 0:  # one row per (user, item) pair on every input, whatever Dim it was given
                names[expr] = "batch"
            elif roles.get(name) == "sequence":
                sequences += 1
                names[expr] = "seq" if sequences == 1 else f"seq_{sequences}"
            else:
                names[expr] = f"{name}_{axis}"
    shapes = {}
    for name in inputs:
        dims: list[Dim] = []
        for d in placeholders[name].meta["val"].shape:
            dims.append(_dim_name(d, names) if isinstance(d, torch.SymInt) else int(d))
        shapes[name] = tuple(dims)
    minimums, maximums = {}, {}
    for sym, vr in ep.range_constraints.items():
        dim = names.get(sym)
        if dim is None:
            continue
        lo, hi = _finite(vr.lower), _finite(vr.upper)
        if lo is not None and lo > 1:  # two symbols named alike (batch of two Dims): the tighter bounds
            minimums[dim] = max(lo, minimums.get(dim, lo))
        if hi is not None and hi < UNBOUNDED:
            maximums[dim] = min(hi, maximums.get(dim, hi))
    return ProgramDims(shapes, names, minimums, maximums)


def _dim_name(d: torch.SymInt, names: Mapping[Any, str]) -> str:
    import sympy

    expr = d.node.expr
    if isinstance(expr, sympy.Symbol):
        return names.get(expr, str(expr))
    return str(expr.subs({s: sympy.Symbol(n) for s, n in names.items() if s in expr.free_symbols}))


def _finite(bound: Any) -> int | None:
    text = str(bound)
    return int(text) if text.lstrip("-").isdigit() else None


def output_shape(val: Any, dims: ProgramDims) -> tuple[Dim, ...]:
    """An output's shape in the inputs' dim names; its leading axis is the batch axis (outputs are
    per row), whatever symbol the graph gave it."""
    import torch

    out: list[Dim] = []
    for i, d in enumerate(getattr(val, "shape", ())):
        if i == 0:
            out.append("batch")
        elif isinstance(d, torch.SymInt):
            out.append(_dim_name(d, dims.symbols))
        else:
            out.append(int(d))
    return tuple(out) if out else ("batch",)


def dim_range(name: str, minimums: Mapping[str, int], maximums: Mapping[str, int]) -> tuple[int, int | None]:
    """(min, max) a symbolic axis may take: at least 1, max None when unbounded."""
    return max(1, int(minimums.get(name, 1))), (int(maximums[name]) if name in maximums else None)


def example_size(name: str, minimums: Mapping[str, int], maximums: Mapping[str, int],
                 wanted: int | None = None) -> int:
    """A size for axis ``name`` in example inputs: ``wanted`` (e.g. ``bench --seq-len``; refused
    outside the axis' range) or EXAMPLE_SIZE clamped into the range."""
    lo, hi = dim_range(name, minimums, maximums)
    if wanted is not None:
        if wanted < lo or (hi is not None and wanted > hi):
            raise BadInputError(f"a {name} length of {wanted} is outside the model's range {lo}..{hi or 'unbounded'}",
                                f"pick a {name} length inside it (the program was exported with that range)")
        return wanted
    size = max(lo, EXAMPLE_SIZE)
    return min(size, hi) if hi is not None else size


def concrete_shape(shape: Iterable[Dim], rows: int, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """``shape`` with ``batch`` = ``rows``, named axes from ``sizes`` and expressions evaluated."""
    import sympy

    values = {"batch": rows, **sizes}
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d in values:
            out.append(int(values[d]))
        elif d.isidentifier():
            out.append(rows)  # a name nothing sized: rows (as every symbolic axis was before ranges)
        else:
            expr = sympy.sympify(d)  # an expression of named axes, e.g. "seq + 1" (written by program_dims)
            out.append(int(expr.subs({sympy.Symbol(k): v for k, v in values.items()})))
    return tuple(out)


def check_maximums(bound: Mapping[str, int], maximums: Mapping[str, int]) -> None:
    """Refuse a request whose axis is past the range the program was exported with (eager refuses
    it too: the program checks its inputs against its ranges)."""
    for name, hi in maximums.items():
        if name in bound and bound[name] > hi:
            raise BadInputError(f"the {name} axis is {bound[name]}, the model takes at most {hi}",
                                f"send at most {hi} along {name} (its Dim(max=) when it was exported)")


def graph_maximums(gm: torch.fx.GraphModule, specs: Iterable[Any]) -> dict[str, int]:
    """Upper bounds of the named axes of ``specs`` as ``gm``'s placeholders carry them (the symbolic
    shapes a traced graph keeps from its program): what a pass's re-export of a segment must pass to
    ``Dim(max=)``, or torch refuses the re-export on the graph's own range checks."""
    import torch

    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    out: dict[str, int] = {}
    for spec in specs:
        val = placeholders[spec.name].meta.get("val") if spec.name in placeholders else None
        for d, name in zip(getattr(val, "shape", ()), spec.shape):
            if not (isinstance(d, torch.SymInt) and isinstance(name, str) and name.isidentifier()):
                continue
            ranges = getattr(d.node.shape_env, "var_to_range", {})
            hi = _finite(ranges[d.node.expr].upper) if d.node.expr in ranges else None
            if hi is not None:
                out[name] = min(hi, out.get(name, hi))
    return out

"""Role propagation through a ``torch.export`` graph, and cutting it into segments.

Used by the request-level passes (``split_user_item``, ``extract_kv_cache``). The graph is the
program's unlifted module (parameters as ``get_attr``). Every node gets a role:

- ``user``: a tensor computed only from user-side inputs (roles user/sequence), constants and sizes;
- ``item``: a tensor that depends on an item input;
- ``const``: a tensor computed from parameters/constants (and sizes) only — copied into every
  segment that needs it;
- ``size``: a symbolic integer (batch size, sequence length…) — re-derived in each segment from
  that segment's own inputs, so the batch symbol means U users in the user segment and N
  candidates in the item segment;
- ``drop``: guard/assertion nodes (the segment programs are re-exported and get their own).

A segment graph is built by copying the nodes its outputs need, in topological order, with some
nodes *bound* to new inputs (user state arriving from another segment, gathered by
``user_index`` along its batch axis). Each segment is then re-exported with ``torch.export`` so
that it is a self-contained program with named dynamic axes.

The helpers both request-level passes share live here too: the precondition on the bundle's shape
(:func:`single_full_segment`), node descriptions for messages, running a program segment on numpy
feeds, and the postcondition both passes declare — the cut segments composed on a sample request
reproduce the program they were cut from (:func:`check_composition`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import fx

from mixexport.errors import BadInputError, PostconditionError, PreconditionError
from mixexport.specs import Request, TensorSpec

if TYPE_CHECKING:
    from mixexport.bundle import Bundle, Segment

#: The item segment's extra input: the row of the user inputs each candidate belongs to.
USER_INDEX = TensorSpec("user_index", "int64", ("candidates",), "index")

DROP_TARGETS = {torch.ops.aten._assert_tensor_metadata.default}
try:  # not every torch build has these assertion ops
    DROP_TARGETS |= {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default}
except AttributeError:  # pragma: no cover - depends on the torch version
    pass


@dataclass
class Analysis:
    gm: fx.GraphModule
    roles: dict[fx.Node, str]
    placeholders: dict[str, fx.Node]
    outputs: list[fx.Node]
    batch_expr: str

    def role(self, node: fx.Node) -> str:
        return self.roles[node]

    def consumers(self, node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if self.roles.get(u) != "drop"]


def _tensor_val(node: fx.Node) -> Any:
    return node.meta.get("val")


def _is_size(node: fx.Node) -> bool:
    v = _tensor_val(node)
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) or (
        node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, operator.mul,
                                                       operator.floordiv, operator.add, operator.sub))


def expr(d: Any) -> str:
    """A size's symbolic expression as text (ints as themselves)."""
    return str(d.node.expr) if isinstance(d, torch.SymInt) else str(int(d))


def analyze(program: torch.export.ExportedProgram, inputs: tuple[TensorSpec, ...]) -> Analysis:
    """Roles of every node of ``program``'s unlifted graph (see the module docstring)."""
    gm = program.module()
    roles: dict[fx.Node, str] = {}
    placeholders: dict[str, fx.Node] = {}
    spec_roles = {s.name: ("user" if s.user_side else "item") for s in inputs}
    outputs: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name not in spec_roles:
                raise BadInputError(f"program input {node.name!r} has no spec", "report this as a bug")
            roles[node] = spec_roles[node.name]
            placeholders[node.name] = node
        elif node.op == "get_attr":
            roles[node] = "const"
        elif node.op == "output":
            outputs = list(node.args[0]) if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
        elif node.op == "call_module" or node.target in DROP_TARGETS:
            roles[node] = "drop"  # _guards_fn and tensor-metadata assertions
        elif _is_size(node):
            roles[node] = "size"
        else:
            deps = {roles[a] for a in node.all_input_nodes if roles.get(a) not in ("size", "drop")}
            roles[node] = "item" if "item" in deps else "user" if "user" in deps else "const"
    first = next(iter(placeholders.values()))
    return Analysis(gm=gm, roles=roles, placeholders=placeholders, outputs=outputs,
                    batch_expr=expr(_tensor_val(first).shape[0]))


def boundary(analysis: Analysis, side: str = "user") -> list[fx.Node]:
    """``side`` nodes whose values an item-side node (or a graph output) consumes, in graph order."""
    out = []
    for node in analysis.gm.graph.nodes:
        if analysis.roles.get(node) != side:
            continue
        if any(analysis.roles.get(u) == "item" for u in analysis.consumers(node)) or node in analysis.outputs:
            out.append(node)
    return out


def batch_axis(node: fx.Node, batch_expr: str) -> int:
    """The one axis of ``node``'s value whose size is the batch symbol."""
    shape = _tensor_val(node).shape
    axes = [i for i, d in enumerate(shape) if expr(d) == batch_expr]
    if len(axes) != 1:
        raise BadInputError(f"cannot cut at {node.name}: expected exactly one batch axis in its shape "
                            f"{[expr(d) for d in shape]}, found {len(axes)}",
                            "keep the batch on one axis of tensors that cross from user to item side")
    return axes[0]


def tensor_spec(node: fx.Node, name: str, role: str, dim_names: Mapping[str, str]) -> TensorSpec:
    """The spec of a boundary value, its symbolic axes named through ``dim_names`` (expr → name).

    An axis that is an expression of named dims (e.g. ``groups + 3``: the global tokens followed by
    the merged sequence) keeps that expression with the names substituted.
    """
    import sympy

    val = _tensor_val(node)
    shape: list[int | str] = []
    for d in val.shape:
        if not isinstance(d, torch.SymInt):
            shape.append(int(d))
            continue
        e = d.node.expr
        if str(e) in dim_names:
            shape.append(dim_names[str(e)])
            continue
        symbols = {f: sympy.Symbol(dim_names[f.name]) for f in e.free_symbols if f.name in dim_names}
        named = e.subs(symbols)
        if not named.free_symbols <= set(symbols.values()):
            raise BadInputError(f"cannot cut at {node.name}: axis size {e} is neither static nor an expression of "
                                f"the known dims {sorted(dim_names.values())}",
                                "keep tensors crossing segments static except for batch/sequence axes")
        shape.append(str(named))
    return TensorSpec(name, str(val.dtype).replace("torch.", ""), tuple(shape), role)


class SegmentBuilder:
    """Copies the part of an analysed graph that some outputs need into a new graph.

    ``inputs`` are new placeholders; ``bind`` maps old nodes to values of the new graph (e.g. a
    placeholder of user state, gathered by ``user_index``); ``size_providers`` are new placeholders
    whose axes resolve symbolic sizes (by expression) instead of copying the old size nodes.
    """

    def __init__(self, analysis: Analysis) -> None:
        self.a = analysis
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.providers: list[tuple[fx.Node, list[str], set[int]]] = []
        self.placeholders: dict[str, fx.Node] = {}

    def input(self, name: str, like: fx.Node | list[str], size_axes: Iterable[int] | None = None) -> fx.Node:
        """A new placeholder shaped like the old node ``like`` (or with these size expressions);
        its ``size_axes`` (default: all) resolve symbolic sizes of the copied nodes."""
        ph = self.graph.placeholder(name)
        if isinstance(like, fx.Node):
            ph.meta = dict(like.meta)
            shape = [expr(d) for d in _tensor_val(like).shape]
        else:
            shape = list(like)
        self.placeholders[name] = ph
        self.providers.append((ph, shape, set(range(len(shape))) if size_axes is None else set(size_axes)))
        return ph

    def bind(self, old: fx.Node, new: fx.Node) -> None:
        self.env[old] = new

    def call(self, target: Callable[..., Any], *args: Any) -> fx.Node:
        return self.graph.call_function(target, args)

    def _resolve_size(self, node: fx.Node) -> fx.Node | None:
        want = expr(_tensor_val(node)) if isinstance(_tensor_val(node), torch.SymInt) else None
        if want is None:
            return None
        for ph, shape, axes in self.providers:
            for ax in sorted(axes):
                if shape[ax] == want:
                    return self.graph.call_function(torch.ops.aten.sym_size.int, (ph, ax))
        return None

    def value(self, old: fx.Node) -> fx.Node:
        """The new-graph node for ``old``, copying whatever it needs (in graph order)."""
        if old in self.env:
            return self.env[old]
        needed: list[fx.Node] = []
        seen: set[fx.Node] = set()
        stack = [old]
        while stack:
            n = stack.pop()
            if n in seen or n in self.env:
                continue
            seen.add(n)
            if n.op == "placeholder":
                raise BadInputError(f"segment needs input {n.name!r}, which is not one of its inputs",
                                    "report this as a bug")
            if self.a.roles.get(n) == "size":
                resolved = self._resolve_size(n)
                if resolved is not None:
                    self.env[n] = resolved
                    continue
            needed.append(n)
            stack.extend(n.all_input_nodes)
        order = {n: i for i, n in enumerate(self.a.gm.graph.nodes)}
        for n in sorted(needed, key=order.__getitem__):
            self.env[n] = self.graph.node_copy(n, lambda x: self.env[x])
        return self.env[old]

    def module(self, outputs: list[fx.Node]) -> fx.GraphModule:
        self.graph.output(tuple(self.value(o) for o in outputs))
        self.graph.eliminate_dead_code()
        gm = fx.GraphModule(self.a.gm, self.graph)
        gm.graph.lint()
        return gm


def gather_rows(builder: SegmentBuilder, state: fx.Node, axis: int, index: fx.Node) -> fx.Node:
    """``state`` (leading U along ``axis``) → N rows picked by ``user_index``, inside the graph."""
    return builder.call(torch.ops.aten.index_select.default, state, axis, index)


def export_segment(gm: fx.GraphModule, specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray],
                   multiples: Mapping[str, tuple[str, int]] | None = None,
                   minimums: Mapping[str, int] | None = None) -> torch.export.ExportedProgram:
    """Re-export a segment graph; every symbolic axis in ``specs`` becomes a named dynamic Dim.

    ``multiples`` declares derived axes: ``{"seq": ("groups", 4)}`` exports seq as 4·groups.
    """
    from mixexport.source import dynamic_shapes

    from mixexport.program.shapes import graph_maximums

    dynamic = dynamic_shapes(specs, multiples, minimums, graph_maximums(gm, specs))  # a .pt2's Dim(max=) kept
    kwargs = {s.name: torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in specs}
    return torch.export.export(gm, (), kwargs=kwargs, dynamic_shapes=dynamic, strict=False)


def input_dim_names(program: torch.export.ExportedProgram, specs: tuple[TensorSpec, ...],
                    multiples: Mapping[str, tuple[str, int]] | None = None) -> dict[str, str]:
    """Symbol → dim name for the program's inputs (``s37`` → ``batch``; for ``seq`` = K·``groups``,
    the base symbol → ``groups`` and ``K*s84`` → ``seq``)."""
    out: dict[str, str] = {}
    phs = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for spec in specs:
        val = phs[spec.name].meta.get("val") if spec.name in phs else None
        for d, name in zip(getattr(val, "shape", ()), spec.shape):
            if isinstance(d, torch.SymInt) and isinstance(name, str):
                out[expr(d)] = name
                if multiples and name in multiples:
                    for sym in d.node.expr.free_symbols:
                        out[sym.name] = multiples[name][0]
    return out


def dim_minimums(program: torch.export.ExportedProgram, dim_names: Mapping[str, str]) -> dict[str, int]:
    """Lower bounds the original program proved for its symbols (e.g. ``groups >= recent``), by name."""
    out = {}
    for sym, vr in program.range_constraints.items():
        name = dim_names.get(str(sym))
        if name is not None and str(vr.lower).lstrip("-").isdigit():
            out[name] = int(vr.lower)
    return out


def segment_flops(program: torch.export.ExportedProgram, feeds: Mapping[str, np.ndarray]) -> int:
    """FLOPs of one call of ``program`` (torch's flop counter: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    dtypes = {n.name: n.meta["val"].dtype for n in program.graph.nodes if n.op == "placeholder" and "val" in n.meta}
    args = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    args = {k: t.to(dtypes[k]) if k in dtypes else t for k, t in args.items()}
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        program.module()(**args)
    return int(counter.get_total_flops())


#: Candidate counts the split's saving is predicted at (inspect, the pass report, bench).
PREDICT_AT = (1, 16, 64, 256, 1024)


def predicted_speedup(f_full: int, f_user: int, f_item: int, at: Iterable[int] = PREDICT_AT) -> dict[str, float | None]:
    """Unsplit over split FLOPs for 1 user × N candidates: ``N·F / (F_user + N·F_item)``: the unsplit
    program runs everything N times, the split one its user part once and its item part N times."""
    return {str(n): (n * f_full) / (f_user + n * f_item) if f_user + n * f_item else None for n in at}


def role_flops(analysis: Analysis, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """FLOPs of one call of the analysed graph on ``feeds``, by the role of the node that spends them
    (``user``, ``item``, ``const``): what a split would run once per user and what per candidate,
    measured without cutting the graph (torch's flop counter, node by node: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    totals: dict[str, int] = {"user": 0, "item": 0, "const": 0}
    roles = analysis.roles

    class Counting(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.op != "call_function" or roles.get(n) not in totals:
                return super().run_node(n)
            with FlopCounterMode(display=False) as counter:
                out = super().run_node(n)
            totals[roles[n]] += int(counter.get_total_flops())
            return out

    dtypes = {name: _tensor_val(ph).dtype for name, ph in analysis.placeholders.items()}
    args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(dtypes[name]) for name in analysis.placeholders]
    with torch.inference_mode():
        Counting(analysis.gm).run(*args)
    return totals


# --------------------------------------------------------------------------------------------
# shared by the request-level passes (split-user-item, extract-kv-cache)

def single_full_segment(bundle: Bundle, pass_name: str) -> Segment:
    """The bundle's one full program-stage segment, which has user-side and item inputs; raises
    :class:`PreconditionError` saying what was found otherwise."""
    if bundle.stage != "program" or len(bundle.segments) != 1 or bundle.segments[0].role != "full":
        found = [(s.name, s.role) for s in bundle.segments]
        raise PreconditionError(f"{pass_name} expects one full program-stage segment, found {found} at "
                                f"stage {bundle.stage}", "run it before any other request-level pass")
    seg = bundle.segments[0]
    if not any(s.user_side for s in seg.inputs) or all(s.user_side for s in seg.inputs):
        raise PreconditionError(f"{pass_name} needs both user-side and item inputs, found roles "
                                f"{sorted({s.role for s in seg.inputs})}", "declare input roles")
    return seg


def describe_node(node: Any) -> str:
    """``name (target, in module.path)``: where a node of the graph comes from, for messages."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return f"{node.name} ({node.target}{', in ' + path if path else ''})"


def rename_batch(specs: tuple[TensorSpec, ...], name: str) -> tuple[TensorSpec, ...]:
    """``specs`` with the ``batch`` axis renamed (``users`` or ``candidates`` in a segment)."""
    return tuple(TensorSpec(s.name, s.dtype, tuple(name if d == "batch" else d for d in s.shape), s.role, s.vocab,
                            s.ids) for s in specs)


def run_program(program: torch.export.ExportedProgram, feeds: Mapping[str, np.ndarray],
                outputs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """One call of a program segment in torch: numpy in, numpy out by the output specs' names."""
    from mixexport.backends.eager import ProgramSession

    with ProgramSession(program, [s.name for s in outputs]) as session:
        return session.run(feeds)


def compose(segments: Iterable[Segment], request: Request) -> dict[str, np.ndarray]:
    """Run program segments in order on ``request``: each reads the request's user and item inputs,
    ``user_index`` and what the segments before it produced. Returns every value by name."""
    values: dict[str, np.ndarray] = {**request.user, **request.item, USER_INDEX.name: request.user_index}
    for seg in segments:
        values.update(run_program(seg.program, {s.name: values[s.name] for s in seg.inputs}, seg.outputs))
    return values


def check_composition(pass_name: str, before: Bundle, after: Bundle, check_atol: float,
                      request: Request) -> float:
    """The postcondition of a request-level pass: ``after``'s segments composed on ``request`` must
    reproduce ``before``'s full program on the request's rows — within ``check_atol`` in fp32, within
    the precision's default tolerance otherwise (reduced precision rounds differently per graph).
    Returns the largest absolute difference; raises :class:`PostconditionError` naming every output
    that differs."""
    from mixexport.verification.compare import DEFAULT_TOLERANCES, Tolerance, compare_output

    full = before.segments[0]
    expected = run_program(full.program, request.rows(), full.outputs)
    values = compose(after.segments, request)
    got = {s.name: values[s.name] for s in after.segments[-1].outputs}
    precision = before.precision
    rtol, atol = (0.0, check_atol) if precision == "fp32" else DEFAULT_TOLERANCES.get(precision, (0.0, check_atol))
    results = [compare_output(a, got[a], expected[b], Tolerance(rtol, atol)) for a, b in zip(got, expected)]
    bad = [r for r in results if not r.passed]
    if bad:
        raise PostconditionError(f"{pass_name}: the segments it cut do not reproduce the program they were cut "
                                 "from (the split program differs from the unsplit one): "
                                 + "; ".join(r.line() for r in bad),
                                 f"build without {pass_name} (--passes / --no-passes), and report this model: "
                                 "the pass should have refused it")
    return max(r.max_abs for r in results)

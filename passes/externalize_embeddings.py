"""``externalize-embeddings``: take large embedding tables out of the dense segments.

Every lookup of a chosen table becomes a new float input carrying the looked-up rows, named
``<id input>__<table>`` (``<id input>_c<j>__<table>`` for column ``j`` of a multi-column input; the
table's name is its parameter's, dots as underscores, without ``.weight``). The new input takes the
id input's role and lives in the id input's segment, so user lookups stay in the user segment and
run once per user. The table goes into the bundle as part files (:mod:`mixexport.tables`), served by
a table store; requests still carry ids.

Cases handled, per segment (the pass runs after the request-level passes, on every segment):
- ``aten.embedding`` (``nn.Embedding``, ``F.embedding``), ``index_select(weight, 0, ids)`` and
  ``weight[ids]`` on a parameter;
- ids of any shape: ``[B]``, sequences ``[B,S]``, nested ``[B,N,P]`` (the rows input is the ids'
  shape plus the table width); ids moved before the lookup (``index_select``/``slice``/``select``/
  ``unsqueeze`` along their axes, e.g. a sequence's recent window) are looked up whole and the same
  movement is replayed on the rows in the graph;
- multi-column categorical inputs: the row index is the id input, one of its last-axis columns
  (``ids[..., j]``) and/or the id plus a constant offset per column (``ids + offsets``: one table
  holding every column's vocabulary); the manifest records the column and the offsets, and the
  store applies them;
- pooled bags (sum/mean over the looked-up rows): only the lookup is replaced, the pooling stays in
  the graph;
- a table shared by several id inputs (or read in several segments): one table, one use per input.

A table is refused, with its reason in the report (and as the error when it was named in
``tables=``), when a lookup's row index is computed any other way from the inputs (``id % rows``,
hashing, a TopK as in MSN's memory) or the weight is also read whole (tied output embeddings).

Options (:class:`~mixexport.passes.options.ExternalizeEmbeddingsOptions`): ``min_bytes``, ``tables``,
``dtype`` (float32 | float16 | int8 with a per-row scale), ``partitions``.

Postcondition: the externalized segments, fed the rows the store will serve, reproduce the segments
they replace on a sample request (exactly, for float32 rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from mixexport.bundle import Bundle, Segment
from mixexport.errors import PostconditionError, PreconditionError
from mixexport.partition import compose, dim_minimums, export_segment, input_dim_names, run_program
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.options import ExternalizeEmbeddingsOptions as Options
from mixexport.specs import Request, TensorSpec
from mixexport.tables.layout import (TableEntry, TableUse, default_partitions, rows_input_name, table_name,
                                     tables_version)
from mixexport.tables.stores.memory import memory_lookups
from mixexport.tables.writer import TableData

CHECK_SEED = 13
EMBEDDING = torch.ops.aten.embedding.default
INDEX_SELECT = torch.ops.aten.index_select.default
INDEX = torch.ops.aten.index.Tensor
ADD = (torch.ops.aten.add.Tensor,)
SELECT = torch.ops.aten.select.int
UNSQUEEZE = torch.ops.aten.unsqueeze.default
#: data movement along the ids' axes that commutes with a lookup (replayed on the rows)
MOVES = {SELECT, UNSQUEEZE, torch.ops.aten.index_select.default, torch.ops.aten.slice.Tensor}


@dataclass
class _Site:
    """One lookup of a table in one segment, with how its row index comes from an id input."""

    segment: int
    node: fx.Node
    param: str
    padding_idx: int | None
    use: tuple[str, int | None, tuple[int, ...], tuple[str, ...]] | None   # (input, column, offsets, moves) | refused
    reason: str = ""


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _lookup(node: fx.Node) -> tuple[fx.Node, Any, int | None] | None:
    """(weight node, index node, padding_idx) when ``node`` looks rows up in a table."""
    if node.op != "call_function":
        return None
    a = node.args
    if node.target == EMBEDDING and isinstance(a[0], fx.Node):
        pad = a[2] if len(a) > 2 else node.kwargs.get("padding_idx", -1)
        return a[0], a[1], (int(pad) if isinstance(pad, int) and pad >= 0 else None)
    if node.target == INDEX_SELECT and a[1] == 0:
        return a[0], a[2], None
    if node.target == INDEX and isinstance(a[1], (list, tuple)) and len(a[1]) == 1:
        return a[0], a[1][0], None
    return None


def _index_source(gm: fx.GraphModule, index: Any, specs: dict[str, TensorSpec]) -> tuple[Any, str]:
    """How a row index comes from an id input: ``(input, column, offsets, moves)``, or None and why not.

    Accepted: the id input itself, one of its last-axis columns (``ids[..., j]``), then any data
    movement along the ids' own axes (``index_select``, ``slice``, ``select``, ``unsqueeze``: e.g. the
    recent window of a sequence), then a constant offset (one, or one per last-axis column). The
    movements are replayed in the graph on the looked-up rows (``moves``: node names, inner first),
    which is exact: moving ids and then looking them up reads the same rows as looking up and moving.
    """
    offsets: tuple[int, ...] = (0,)
    node = index
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in ADD:
        x, y = node.args[0], node.args[1]
        consts = [v for v in (y, x) if isinstance(v, fx.Node) and v.op == "get_attr"]
        const = consts[0] if consts else None
        other = x if const is y else y
        if const is None or not isinstance(other, fx.Node):
            return None, f"its row index is computed from the inputs at {node.name} ({node.target})"
        value = _attr(gm, const.target)
        if value.dim() > 1:
            return None, f"its row index adds a {list(value.shape)} constant at {node.name}"
        offsets = tuple(int(v) for v in value.reshape(-1).tolist())
        node = other
    moves: list[fx.Node] = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in MOVES \
            and isinstance(node.args[0], fx.Node):
        moves.append(node)
        node = node.args[0]
    moves.reverse()  # inner first
    column = None
    if moves and moves[0].target == SELECT and node.op == "placeholder":
        rank = len(node.meta["val"].shape) if "val" in node.meta else 0
        if moves[0].args[1] in (-1, rank - 1):
            column = int(moves[0].args[2])
            moves = moves[1:]
    if not (isinstance(node, fx.Node) and node.op == "placeholder" and node.name in specs):
        what = f"{node.name} ({node.target})" if isinstance(node, fx.Node) else repr(node)
        return None, f"its row index is computed in the graph at {what}, not read from an id input"
    if len(offsets) > 1 and (column is not None or moves):
        return None, "its row index adds per-column offsets after selecting or moving the ids"
    spec = specs[node.name]
    if column is None and len(offsets) > 1 and (not spec.shape or spec.shape[-1] != len(offsets)):
        return None, f"its {len(offsets)} offsets do not match the last axis of {node.name} {list(spec.shape)}"
    return (node.name, column, offsets, tuple(m.name for m in moves)), ""


def _replay(graph: fx.Graph, moves: list[fx.Node], rows: fx.Node) -> fx.Node:
    """The ids' movements applied to the looked-up rows (one more, trailing, axis: dims made >= 0)."""
    value = rows
    for m in moves:
        rank = len(m.args[0].meta["val"].shape)
        args = list(m.args)
        args[0] = value
        if isinstance(args[1], int) and args[1] < 0:
            args[1] += rank + (1 if m.target == UNSQUEEZE else 0)
        value = graph.call_function(m.target, tuple(args), dict(m.kwargs))
    return value


def _sites(bundle: Bundle) -> tuple[list[_Site], dict[str, torch.Tensor], dict[str, str]]:
    """Every lookup of every segment; the tables by parameter name; tables read whole (and where)."""
    sites, weights, whole = [], {}, {}
    for i, seg in enumerate(bundle.segments):
        gm = seg.program.module()
        specs = {s.name: s for s in seg.inputs}
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            value = _attr(gm, node.target)
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.dtype.is_floating_point is False:
                continue
            for user in node.users:
                hit = _lookup(user)
                if hit is None or hit[0] is not node:
                    whole.setdefault(node.target, f"{user.name} ({user.target})")
                    continue
                weights[node.target] = value
                use, reason = _index_source(gm, hit[1], specs)
                sites.append(_Site(i, user, node.target, hit[2], use, reason))
    return sites, weights, whole


def requires(bundle: Bundle) -> None:
    """A program-stage bundle with at least one embedding lookup on a parameter table."""
    if bundle.stage != "program":
        raise PreconditionError(f"externalize-embeddings works on program segments, found stage {bundle.stage}",
                                "run it before the ONNX-stage passes")
    sites, _, _ = _sites(bundle)
    if not sites:
        raise PreconditionError("externalize-embeddings needs an embedding lookup (embedding, index_select or "
                                "weight[ids] on a parameter); found none", "build without this pass")


def _choose(bundle: Bundle, options: Options) -> tuple[dict[str, str], dict[str, str], list[_Site], dict[str, Any]]:
    """(chosen table name → parameter, refused table → reason, sites, weights)."""
    sites, weights, whole = _sites(bundle)
    names = {table_name(p): p for p in weights}
    refused: dict[str, str] = {}
    for p in weights:
        why = next((s.reason for s in sites if s.param == p and s.use is None), "")
        if p in whole:
            why = f"the weight is also read whole by {whole[p]}"
        if why:
            refused[table_name(p)] = why
    if options.tables:
        unknown = [t for t in options.tables if t not in names and t not in weights]
        if unknown:
            raise PreconditionError(f"externalize-embeddings: no table named {unknown}; the lookups read "
                                    f"{sorted(names)}", f"e.g. --option externalize-embeddings.tables={sorted(names)[0]}")
        wanted = {table_name(t) if t in weights else t for t in options.tables}
        bad = sorted(t for t in wanted if t in refused)
        if bad:
            raise PreconditionError(f"externalize-embeddings cannot take out table {bad[0]!r}: {refused[bad[0]]}",
                                    "keep that table in the graph (drop it from tables=)")
    else:
        wanted = {t for t, p in names.items() if weights[p].numel() * weights[p].element_size() >= options.min_bytes}
        wanted -= set(refused)
    if not wanted:
        sizes = ", ".join(f"{t} {weights[p].numel() * weights[p].element_size():,} B" for t, p in sorted(names.items()))
        raise PreconditionError(f"externalize-embeddings: no table of at least {options.min_bytes:,} bytes can go "
                                f"out (tables: {sizes}; refused: {refused or 'none'})",
                                "lower --option externalize-embeddings.min_bytes, or name them with tables=")
    return {t: names[t] for t in sorted(wanted)}, refused, sites, weights


def externalize_embeddings(bundle: Bundle, options: Options) -> PassResult:
    """Replace every lookup of the chosen tables with a rows input; the tables join ``bundle.tables``."""
    chosen, refused, sites, weights = _choose(bundle, options)
    by_param = {p: t for t, p in chosen.items()}
    uses: dict[str, dict[str, TableUse]] = {t: {} for t in chosen}
    pads: dict[str, int | None] = {}
    graphs = []
    for i, seg in enumerate(bundle.segments):
        gm = seg.program.module()
        specs = {s.name: s for s in seg.inputs}
        node_of = {n.name: n for n in gm.graph.nodes}
        new_specs: list[TensorSpec] = []
        last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        for site in (s for s in sites if s.segment == i and s.param in by_param):
            table, (name, column, offsets, moves) = by_param[site.param], site.use  # type: ignore[misc]
            weight = weights[site.param]
            rows_name = rows_input_name(name, column, table)
            id_shape = specs[name].shape if column is None else specs[name].shape[:-1]
            spec = TensorSpec(rows_name, str(weight.dtype).replace("torch.", ""), (*id_shape, int(weight.shape[1])),
                              specs[name].role)
            old = uses[table].get(rows_name)
            if old is not None and old.offsets != offsets:
                raise PreconditionError(f"externalize-embeddings: {name} reads table {table} with two different "
                                        "offsets", "keep that table in the graph")
            uses[table][rows_name] = TableUse(name, column, offsets, spec)
            pads[table] = site.padding_idx
            ph = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == rows_name), None)
            if ph is None:
                with gm.graph.inserting_after(last_ph):
                    ph = gm.graph.placeholder(rows_name)
                ph.meta = dict(node_of[site.node.name].meta)
                last_ph = ph
                new_specs.append(spec)
            node = node_of[site.node.name]
            with gm.graph.inserting_before(node):
                value = _replay(gm.graph, [node_of[m] for m in moves], ph)
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
        if not new_specs:
            graphs.append(None)
            continue
        gm.graph.eliminate_dead_code()
        for n in [n for n in gm.graph.nodes if n.op == "placeholder" and not n.users and n.name in specs]:
            gm.graph.erase_node(n)  # an id input read only by the lookups is no longer a segment input
        kept = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        # a plain GraphModule over the edited graph: keyword inputs by placeholder name (the unlifted
        # module's pytree signature and input hooks know only the inputs it had), and only the
        # attributes the graph still reads are copied: the tables taken out are not
        gm.graph._codegen = fx.graph.CodeGen()
        gm = fx.GraphModule(gm, gm.graph)
        inputs = tuple(s for s in seg.inputs if s.name in kept) + tuple(new_specs)
        graphs.append((gm, inputs))
    tables = tuple(_table_data(t, chosen[t], weights[chosen[t]], uses[t], pads.get(t), options) for t in chosen)
    segments = _export(bundle, graphs, tables)
    version = tables_version([t.entry for t in bundle.tables + tables])
    report = {"tables": [{"name": t.entry.name, "param": t.entry.source, "rows": t.entry.rows, "dim": t.entry.dim,
                          "bytes": int(weights[chosen[t.entry.name]].numel() * weights[chosen[t.entry.name]].element_size()),
                          "dtype": t.entry.dtype, "partitions": t.entry.partitions,
                          "inputs": [u.rows.name for u in t.entry.uses]} for t in tables],
              "refused": refused, "tables_version_inputs": version}
    # a sequence cache appends the sequence's rows input together with its ids
    rows_of = {u.rows.name: u.input for t in tables for u in t.entry.uses}
    producer = {seg.name: seg for seg in segments}
    caches = tuple(dataclasses.replace(c, along=tuple(sorted({*c.along, *(
        s.name for s in producer[c.producer].inputs if rows_of.get(s.name) == c.input)}))) for c in bundle.caches)
    return PassResult(bundle.replace(segments=segments, tables=bundle.tables + tables, caches=caches), report)


def _table_data(name: str, param: str, weight: torch.Tensor, uses: dict[str, TableUse], pad: int | None,
                options: Options) -> TableData:
    rows, dim = int(weight.shape[0]), int(weight.shape[1])
    itemsize = {"float32": 4, "float16": 2, "int8": 1}[options.dtype]
    stored = rows * dim * itemsize + (rows * 4 if options.dtype == "int8" else 0)
    entry = TableEntry(name, rows, dim, options.dtype, str(weight.dtype).replace("torch.", ""),
                       options.partitions or default_partitions(stored), pad, tuple(uses.values()), source=param)
    return TableData(entry, weight)


def _export(bundle: Bundle, graphs: list[Any], tables: tuple[TableData, ...]) -> tuple[Segment, ...]:
    """Re-export every changed segment, traced on the sample request with the rows the store serves."""
    request = bundle.source.example_request(2, 5, seed=CHECK_SEED)
    values = _values(bundle.segments, request, bundle.tables)
    lookups = memory_lookups(bundle.tables + tables)
    wide = lookups.expand(request) if lookups else request
    values.update({**wide.user, **wide.item})
    flat = wide.rows()
    out = []
    for seg, graph in zip(bundle.segments, graphs):
        if graph is None:
            out.append(seg)
            continue
        gm, inputs = graph
        feeds = {s.name: (flat if seg.role == "full" else values)[s.name] for s in inputs}
        multiples = dict(bundle.source.multiples)
        minimums = dim_minimums(seg.program, input_dim_names(seg.program, seg.inputs, multiples))
        program = export_segment(gm, inputs, feeds, multiples, minimums)
        out.append(dataclasses.replace(seg, inputs=inputs, program=program))
    return tuple(out)


def _values(segments: tuple[Segment, ...], request: Request, tables: tuple[TableData, ...]) -> dict[str, np.ndarray]:
    """Every value of ``segments`` on ``request`` (rows of tables already out included), by name."""
    lookups = memory_lookups(tables)
    wide = lookups.expand(request) if lookups else request
    if segments[0].role == "full":
        rows = wide.rows()
        seg = segments[0]
        return {**wide.user, **wide.item, **run_program(seg.program, {s.name: rows[s.name] for s in seg.inputs},
                                                        seg.outputs)}
    return compose(segments, wide)


def ensures(before: Bundle, after: Bundle, options: Options) -> dict[str, Any]:
    """The externalized segments, fed the store's rows, reproduce the segments they replace (exactly
    for float32 rows; float16/int8 rows: the difference is reported, the build's parity gate judges)."""
    request = before.source.example_request(3, 7, seed=CHECK_SEED + 1)
    want = _values(before.segments, request, before.tables)
    got = _values(after.segments, request, after.tables)
    diff = max(float(np.abs(got[s.name].astype(np.float64) - want[s.name]).max()) for s in after.segments[-1].outputs)
    if options.dtype == "float32" and diff > 1e-5:
        raise PostconditionError(f"externalize-embeddings: the segments with float32 rows differ from the graph "
                                 f"with the table inside by {diff:.3g} (expected <= 1e-5)",
                                 "build without this pass and report this model")
    return {"check_max_abs_diff": diff}


PASS = PassInfo(name="externalize-embeddings", stage="program", run=externalize_embeddings, options=Options,
                requires=requires, ensures=ensures)


def plan(bundle: Bundle, options: Options | None = None) -> dict[str, Any]:
    """What the pass would do with ``options`` (default: the defaults), for ``mixexport inspect``:
    every table a lookup reads with its bytes and whether it goes out (or why not), and the bytes
    that stay in the dense segments vs go to part files (the bundle holds both)."""
    options = options or Options()
    sites, weights, whole = _sites(bundle)
    try:
        chosen, refused, _, _ = _choose(bundle, options)
    except PreconditionError:
        chosen, refused = {}, {table_name(p): "" for p in weights}
        for s in sites:
            if s.use is None:
                refused[table_name(s.param)] = s.reason
        refused.update({table_name(p): f"the weight is also read whole by {w}" for p, w in whole.items()
                        if p in weights})
        refused = {k: v for k, v in refused.items() if v}
    program = bundle.segments[0].program
    dense = sum(int(t.numel() * t.element_size()) for t in program.state_dict.values())
    tables = []
    for p, w in sorted(weights.items()):
        name, size = table_name(p), int(w.numel() * w.element_size())
        why = refused.get(name) or ("" if name in chosen else f"smaller than min_bytes {options.min_bytes:,}")
        tables.append({"name": name, "param": p, "rows": int(w.shape[0]), "dim": int(w.shape[1]), "bytes": size,
                       "out": name in chosen, "why_not": why or None})
    out = sum(t["bytes"] for t in tables if t["out"])
    return {"min_bytes": options.min_bytes, "tables": tables, "dense_bytes_in_graph": dense,
            "dense_bytes_after": dense - out, "table_file_bytes": out}

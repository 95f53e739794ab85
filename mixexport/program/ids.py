"""Id ranges of a program's integer inputs, found by following each input through the graph to the
table it indexes.

An integer input rarely feeds ``aten.embedding`` as is: libraries cast it first (``.long()``,
``.int()``, ``.to(...)``), shift each column into one shared table (``x + offsets``, the
FeaturesEmbedding pattern), clamp it, or hash it (``x % rows``). This module walks the ExportedProgram
graph forward from every integer input through

- casts and copies (``to``, ``_to_copy``, ``clone``, ``alias``, ``detach``, ``contiguous``);
- layout ops (``view``/``reshape``, ``unsqueeze``/``squeeze``, ``expand``, ``permute``, ``flatten``),
  keeping track of which input column sits at each position of the last axis while they keep it;
- ``select``/``slice`` of columns (``x[:, 2]`` reads column 2 only);
- ``stack``/``cat`` of several inputs (fields stacked before one shared table, a candidate
  appended to its history), keeping each input's own steps;
- arithmetic with constants: ``+``/``-`` (a scalar or one offset per column, from a buffer, a
  lifted constant or a Python tuple), ``*`` by a positive scalar, ``clamp``/``clamp_min``/
  ``clamp_max``/``maximum``/``minimum`` with scalars, ``%``/``fmod`` and ``& mask`` (hashing),

to the ops that index with it: ``embedding``, ``embedding_bag``, ``index_select``, ``gather`` and
``table[idx]`` (``aten.index``) on a table with a static size along the indexed axis. The valid ids
of a column are then the preimage of ``[0, rows)`` under those steps, intersected over every table
the column indexes, and with ``[0, inf)``: ids are never negative, even where a clamp or a modulo
would let eager accept one (-1 is the usual "missing" sentinel, and an ONNX Gather would wrap it).

Decisions (documented for users in the report and ``inspect``):

- ``x % rows`` or ``x & (rows - 1)`` covering the whole table, or a clamp into it: eager accepts any
  id, so the range is open (``id >= 0``); example requests draw ids up to three table widths to
  exercise the wrap or clamp.
- Columns side by side into one table whose values start at increasing offsets (FeaturesEmbedding,
  deepctr's stacked fields): column ``c`` owns the rows from its offset up to the next column's, so
  its ids are ``[0, offsets[c+1] - offsets[c])`` (the last column: the rest of the table). An id
  past its column's slice would silently read the next column's rows in eager; mixexport refuses
  it. Offsets that are not increasing give each column the ids that stay inside the table.
- Anything else on the path (an op not listed, an index mixed with another input, a table whose
  size depends on a dynamic axis) ends that path: the column's range stays unknown unless another
  path finds one, and ``inspect`` and the report say so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from mixexport.program.id_ranges import INF, Chain, image, preimage, text
from mixexport.specs import IdRange, IdRanges

aten = torch.ops.aten

#: ops that copy values unchanged (casts between integer and float dtypes keep small ids exact)
_SAME_VALUES = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default,
                aten.clone.default, aten.alias.default, aten.detach.default, aten.detach_.default,
                aten.contiguous.default, aten.lift_fresh_copy.default, aten.type_as.default,
                aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default,
                aten.permute.default, aten.transpose.int, aten.t.default, aten.flatten.using_ints,
                aten.repeat.default, aten.unflatten.int}
_ADD = {aten.add.Tensor, aten.add.Scalar}
_SUB = {aten.sub.Tensor, aten.sub.Scalar}
_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_MOD = {aten.remainder.Scalar, aten.remainder.Tensor, aten.fmod.Scalar, aten.fmod.Tensor}
_AND = {aten.bitwise_and.Scalar, aten.bitwise_and.Tensor}
_CLAMP = {aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default,
          aten.maximum.default, aten.minimum.default}
#: the only ops without tensor inputs folded into constants (``torch.arange(C) * rows``)
_FACTORIES = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.scalar_tensor.default}
#: random ops never folded into constants
_NOT_CONSTANT = ("rand", "normal", "bernoulli", "dropout", "empty", "uniform", "multinomial")


Key = tuple[str, "int | None"]  # (input, column); column None: the input has no columns


@dataclass(frozen=True)
class _Track:
    """A tensor whose elements come from integer inputs through constant steps. ``members``: the
    (input, column) keys its elements come from; ``last``: the key at each position of its last axis,
    while that is known; ``chains``: the steps applied to each key so far."""

    members: tuple[Key, ...]
    last: tuple[Key, ...] | None
    chains: dict[Key, Chain]
    cast: bool = False


def find_id_ranges(ep: torch.export.ExportedProgram) -> dict[str, IdRanges]:
    """Id ranges of the program's integer user inputs that reach a table: one range for every
    element, or one per last-axis column (None for a column no table was found for)."""
    user_inputs = set(ep.graph_signature.user_inputs)
    constants = _lifted_constants(ep)
    tracks: dict[torch.fx.Node, _Track] = {}
    consts: dict[torch.fx.Node, torch.Tensor] = {}
    columns: dict[str, int] = {}
    found: dict[str, dict[int | None, list[IdRange]]] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in constants:
                consts[node] = constants[node.name]
            elif node.name in user_inputs and _is_int(node):
                shape = node.meta["val"].shape
                cols = int(shape[-1]) if len(shape) >= 2 and isinstance(shape[-1], int) else 0
                columns[node.name] = cols
                keys: tuple[Key, ...] = tuple((node.name, c) for c in range(cols)) or ((node.name, None),)
                tracks[node] = _Track(keys, keys if cols else None, {k: () for k in keys})
            continue
        if node.op != "call_function":
            continue
        for track, rows, pad in _indexes(node, tracks):
            for (name, col), r in _site_ranges(track, rows, pad):
                found.setdefault(name, {}).setdefault(col, []).append(r)
        value = _fold(node, consts)
        if value is not None:
            consts[node] = value
            continue
        t = _propagate(node, tracks, consts)
        if t is not None:
            tracks[node] = t
    return {name: _per_column(by_col, columns[name]) for name, by_col in found.items()}


def _is_int(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and not val.dtype.is_floating_point and val.dtype != torch.bool \
        and not val.dtype.is_complex


def _lifted_constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> value for integer buffers and lifted constants (offset vectors live there)."""
    sig = ep.graph_signature
    out = {}
    for name, target in {**sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}.items():
        value = ep.constants.get(target) if target in ep.constants else ep.state_dict.get(target)
        if isinstance(value, torch.Tensor) and value.numel() <= 1 << 16 and not value.dtype.is_floating_point:
            out[name] = value.detach()
    return out


def _fold(node: torch.fx.Node, consts: dict[torch.fx.Node, torch.Tensor]) -> torch.Tensor | None:
    """The value of ``node`` when every tensor it reads is a small integer constant (``offsets``
    moved, unsqueezed, cumsum'd or cast before the add)."""
    if not isinstance(node.target, torch._ops.OpOverload) or any(w in str(node.target) for w in _NOT_CONSTANT):
        return None
    nodes = node.all_input_nodes
    if (not nodes and node.target not in _FACTORIES) or any(n not in consts for n in nodes):
        return None
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: consts[n])
    try:
        out = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not foldable (e.g. a symbolic size): the path simply ends
        return None
    return out if isinstance(out, torch.Tensor) and out.numel() <= 1 << 16 else None


def _scalar(a: Any, consts: dict[torch.fx.Node, torch.Tensor]) -> torch.Tensor | None:
    """A constant operand as a tensor: a Python number, or a folded constant node."""
    if isinstance(a, bool):
        return None
    if isinstance(a, (int, float)):
        return torch.tensor(a)
    if isinstance(a, torch.fx.Node) and a in consts:
        return consts[a]
    return None


def _propagate(node: torch.fx.Node, tracks: dict[torch.fx.Node, _Track],
               consts: dict[torch.fx.Node, torch.Tensor]) -> _Track | None:
    """The track of ``node`` when it derives from tracked inputs by a supported step."""
    target = node.target
    if target in (aten.cat.default, aten.stack.default):
        return _join(node, tracks)
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    src = tracks.get(node.args[0])
    if src is None or any(n in tracks for n in node.all_input_nodes[1:]):
        return None
    if target in _SAME_VALUES:
        return _relayout(src, node)
    if target in (aten.select.int, aten.slice.Tensor):
        return _pick(src, node)
    if target in _ADD or target in _SUB:
        c = _scalar(node.args[1] if len(node.args) > 1 else None, consts)
        if c is None:
            return None
        return _with_step(src, node, "add", c * node.kwargs.get("alpha", 1) * (-1 if target in _SUB else 1))
    c = _scalar(node.args[1], consts) if len(node.args) > 1 else None
    whole = c is not None and c.numel() == 1 and float(c) == int(float(c))
    if target in _MUL and whole and float(c) > 0:
        return _with_step(src, node, "mul", c)
    if target in _MOD and whole and float(c) > 0:
        return _with_step(src, node, "mod", c)
    if target in _AND and whole and float(c) >= 0:
        return _with_step(src, node, "and", c)
    if target in _CLAMP:
        return _clamp(src, node, consts)
    return None


def _size(node: Any, axis: int = -1) -> int | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or not val.dim():
        return None
    n = val.shape[axis]
    return int(n) if isinstance(n, int) else None


def _join(node: torch.fx.Node, tracks: dict[torch.fx.Node, _Track]) -> _Track | None:
    """``torch.stack``/``torch.cat`` of tracked tensors (fields stacked before one shared table, a
    candidate appended to the history): the last-axis map is kept where it can be."""
    parts = node.args[0]
    out = node.meta.get("val")
    if not isinstance(parts, (list, tuple)) or not isinstance(out, torch.Tensor) or any(p not in tracks for p in parts):
        return None
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % out.dim()
    ts = [tracks[p] for p in parts]
    chains: dict[Key, Chain] = {}
    for t in ts:
        for k, c in t.chains.items():
            if chains.setdefault(k, c) != c:
                return None  # one input reached here along two different paths
    members = tuple(dict.fromkeys(k for t in ts for k in t.members))
    last: tuple[Key, ...] | None = None
    if dim == out.dim() - 1 and node.target is aten.stack.default:  # a new last axis: one position per part
        if all(len(t.members) == 1 for t in ts):
            last = tuple(t.members[0] for t in ts)
    elif dim == out.dim() - 1:  # cat along the last axis: the parts' maps one after the other
        pieces = []
        for p, t in zip(parts, ts):
            n = _size(p)
            piece = t.last if t.last is not None else (t.members * n if len(t.members) == 1 and n else None)
            pieces.append(piece)
        last = None if any(x is None for x in pieces) else tuple(k for x in pieces for k in x)  # type: ignore[union-attr]
    elif all(t.last == ts[0].last for t in ts):
        last = ts[0].last
    return _Track(members, last, chains, any(t.cast for t in ts))


def _relayout(src: _Track, node: torch.fx.Node) -> _Track:
    """Same values, maybe another layout: the last-axis map survives while the last axis stays last
    and keeps its size (a view that merges it into another axis loses it)."""
    a, b = node.args[0].meta.get("val"), node.meta.get("val")
    keep = (src.last is not None and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() > 0
            and b.dim() > 0 and _same(a.shape[-1], b.shape[-1]))
    if keep and node.target is aten.permute.default:
        keep = node.args[1][-1] % a.dim() == a.dim() - 1
    elif keep and node.target is aten.transpose.int:
        keep = a.dim() - 1 not in {d % a.dim() for d in node.args[1:3]}
    elif node.target is aten.t.default:
        keep = False
    cast = src.cast or node.target in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)
    return replace(src, last=src.last if keep else None, cast=cast)


def _pick(src: _Track, node: torch.fx.Node) -> _Track | None:
    """``x[:, c]`` / ``x[:, a:b]``: which keys remain."""
    a = node.args[0].meta.get("val")
    if not isinstance(a, torch.Tensor):
        return None
    dim = node.args[1] % a.dim() if len(node.args) > 1 else 0
    if dim != a.dim() - 1:  # rows or positions: the last-axis map is untouched (a select drops an axis)
        b = node.meta.get("val")
        same = isinstance(b, torch.Tensor) and b.dim() > 0 and _same(b.shape[-1], a.shape[-1])
        return replace(src, last=src.last if same else None)
    if src.last is None:  # positions of a sequence: fine for one key, ambiguous for several
        return src if len(src.members) == 1 else None
    if node.target is aten.select.int:
        key = src.last[node.args[2]]
        return _Track((key,), None, {key: src.chains[key]}, src.cast)
    start, end, step = (list(node.args[2:]) + [None, None, 1])[:3]
    keys = src.last[slice(start, end if end is None or end < 1 << 62 else None, step)]
    return _Track(tuple(dict.fromkeys(keys)), keys, {k: src.chains[k] for k in keys}, src.cast)


def _same(x: Any, y: Any) -> bool:
    """Equal axis sizes, also for symbolic ones (compared by name: no guard is added)."""
    return x == y if isinstance(x, int) and isinstance(y, int) else str(x) == str(y)


def _with_step(src: _Track, node: torch.fx.Node, kind: str, c: torch.Tensor) -> _Track | None:
    """Append ``kind`` with constant ``c``: a scalar, or one value per last-axis position."""
    out = node.meta.get("val")
    chains = dict(src.chains)
    if c.numel() == 1:
        for k in src.members:
            chains[k] = chains[k] + ((kind, float(c.reshape(()))),)
        return replace(src, chains=chains, last=src.last if isinstance(out, torch.Tensor) and out.dim() else None)
    if src.last is None or any(d != 1 for d in c.shape[:-1]) or c.shape[-1] != len(src.last):
        return None  # varies along another axis, or the last-axis map is lost
    for k, v in zip(src.last, c.reshape(-1).tolist()):
        chains[k] = chains[k] + ((kind, float(v)),)
    return replace(src, chains=chains)


def _clamp(src: _Track, node: torch.fx.Node, consts: dict[torch.fx.Node, torch.Tensor]) -> _Track | None:
    t = node.target
    if t in (aten.clamp.default, aten.clamp.Tensor):
        lo_arg, hi_arg = (list(node.args[1:]) + [node.kwargs.get("min"), node.kwargs.get("max")])[:2]
    else:
        lo_arg, hi_arg = (node.args[1], None) if t in (aten.clamp_min.default, aten.maximum.default) \
            else (None, node.args[1])
    bounds = []
    for arg, none in ((lo_arg, -INF), (hi_arg, INF)):
        c = None if arg is None else _scalar(arg, consts)
        if arg is not None and (c is None or c.numel() != 1):
            return None
        bounds.append(none if c is None else float(c))
    chains = {k: src.chains[k] + (("clamp", (bounds[0], bounds[1])),) for k in src.members}
    return replace(src, chains={**src.chains, **chains})


def _indexes(node: torch.fx.Node, tracks: dict[torch.fx.Node, _Track]) -> list[tuple[_Track, int, int | None]]:
    """(track, rows of the indexed axis, padding row) for each tracked index ``node`` reads."""
    t, args = node.target, node.args
    found: list[tuple[Any, int | None, int | None]] = []
    if t is aten.embedding.default:
        pad = args[2] if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0 else None
        found.append((args[1], _size(args[0], 0), pad))
    elif t in (aten.embedding_bag.default, aten._embedding_bag.default, aten.embedding_bag.padding_idx,
               aten._embedding_bag_forward_only.default):
        found.append((args[1], _size(args[0], 0), None))
    elif t in (aten.index_select.default, aten.gather.default):
        dim = args[1] if isinstance(args[1], int) else 0
        found.append((args[2], _size(args[0], dim), None))
    elif t is aten.index.Tensor:
        found += [(idx, _size(args[0], dim), None) for dim, idx in enumerate(args[1]) if idx is not None]
    return [(tracks[i], n, pad) for i, n, pad in found if isinstance(i, torch.fx.Node) and i in tracks and n]


def _site_ranges(track: _Track, rows: int, pad: int | None) -> list[tuple[Key, IdRange]]:
    """The range of every key at one indexing site. Keys side by side on the last axis whose
    values start at increasing offsets (FeaturesEmbedding) each own the rows up to the next one's."""
    target = {k: (0.0, float(rows)) for k in track.members}
    if track.last is not None and len(set(track.last)) == len(track.last) > 1:
        starts = [image(track.chains[k])[0] for k in track.last]
        if starts[0] >= 0 and all(b > a for a, b in zip(starts, starts[1:])) and starts[-1] < rows:
            ends = starts[1:] + [float(rows)]
            target.update({k: (lo, hi) for k, lo, hi in zip(track.last, starts, ends)})
    out = []
    for key in track.members:
        chain = track.chains[key]
        r = preimage(chain, *target[key])
        if r is None:
            continue
        low, high = r
        shift = sum(v for kind, v in chain if kind == "add") if all(kind == "add" for kind, _ in chain) else None
        padding = int(pad - shift) if pad is not None and shift is not None and low <= pad - shift < high else None
        steps = "".join(f" {text(kind, v)}" for kind, v in chain if not (kind == "add" and v == 0))
        via = f"{'cast, ' if track.cast else ''}x{steps} indexes {rows} rows"
        if target[key] != (0.0, float(rows)):
            via += f" (its slice {int(target[key][0])}..{int(target[key][1])})"
        out.append((key, IdRange(int(low), None if high == INF else int(high), rows=rows, padding=padding, via=via)))
    return out


def _per_column(by_col: dict[int | None, list[IdRange]], columns: int) -> IdRanges:
    """Intersect the ranges found for each column; one range when every column has the same."""
    def meet(rs: list[IdRange]) -> IdRange | None:
        low = max(r.low for r in rs)
        highs = [r.high for r in rs if r.high is not None]
        high = min(highs) if highs else None
        if high is not None and low >= high:
            return None  # no id is valid for every table the column indexes
        pad = next((r.padding for r in rs if r.padding is not None), None)
        return IdRange(low, high, rows=min(r.rows or 0 for r in rs) or None, padding=pad,
                       via="; ".join(dict.fromkeys(r.via for r in rs)))

    common = by_col.get(None, [])
    if not columns or set(by_col) == {None}:
        return (meet(common),)
    per = [meet(by_col.get(c, []) + common) if by_col.get(c) or common else None for c in range(columns)]
    return (per[0],) if all(p == per[0] for p in per) else tuple(per)

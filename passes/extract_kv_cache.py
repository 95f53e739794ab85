"""``extract-kv-cache`` (LONGER and HyFormer serving): compute the behaviour sequences' K/V once per
user, keep them in a per-user cache across requests, and run only the candidates' queries against them.

Cases handled:
- attention is found in both forms: ``scaled_dot_product_attention`` and the decomposed
  ``matmul(q, kᵀ) → (scale, bias) → softmax → matmul(·, v)``;
- roles are propagated as in ``split-user-item``; the user-side values that the per-candidate side
  reads are split into the **cache** — tensors with a per-position sequence axis (the K/V of the
  merged behaviours, their padding mask) — and the **user state** (the rest: e.g. the K/V of
  user-only global tokens and of the recent-behaviour queries of later layers);
- **windows**: the keys or values of a sequence attention that are computed from the sequence input
  alone but over a fixed number of its most recent positions (HyFormer's short recent sequence)
  are cached too, as ``window`` tensors: every layer's K/V of every sequence is in the cache, each
  tensor declared in the manifest (``layout``: keys / values / other, per-position / window);
- three segments: ``cache`` (sequence → cache tensors, dynamic sequence axis), ``user`` (user
  inputs + cache → state; omitted when there is no state) and ``item`` (cache + state + item
  inputs + ``user_index`` → scores, the per-user tensors gathered to the candidates in-graph);
- **append**, derived, never assumed: when the per-position tensors built for a window equal the
  concatenation of those of its two halves, and the window tensors built from its second half equal
  those of the whole (checked numerically here, at a group boundary), the K/V of a position depend
  only on that position: new behaviours can be appended (and old ones slid out) without recomputing
  the rest. The manifest says ``appendable`` and the runtime then extends a cached user
  incrementally (recomputing only the window tensors, from the newest behaviours). A sequence
  encoder that mixes positions (self-attention) fails the check: the cache is declared not
  appendable, and the runtime rebuilds a user whose history changed (a miss).

Refused with a precondition error: no attention over the sequence; a static sequence axis (the
program must be exported with a dynamic ``seq`` axis); and BST-style models, where the candidate
sits inside the sequence's self-attention so that the sequence's K/V depend on item inputs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from mixexport.bundle import Bundle, CacheSpec, Segment
from mixexport.errors import PreconditionError
from mixexport.partition import (USER_INDEX, Analysis, SegmentBuilder, analyze, batch_axis, boundary,
                                 check_composition, describe_node, dim_minimums, export_segment, expr, gather_rows,
                                 rename_batch, run_program, segment_flops, single_full_segment, tensor_spec)
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.options import ExtractKvCacheOptions as Options
from mixexport.specs import TensorSpec, random_ids

SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
MATMUL = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
SCORE_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor,
             torch.ops.aten.sub.Tensor, torch.ops.aten.mul.Scalar, torch.ops.aten.div.Scalar,
             torch.ops.aten.masked_fill.Scalar, torch.ops.aten.where.self}
VIEW_OPS = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.t.default}
PREDICT_AT = (1, 16, 64, 256, 1024)
CHECK_SEED = 13  # the sample request (2 users x 5 candidates) the segments are exported and checked on



@dataclass
class Plan:
    analysis: Analysis
    seq_input: str
    groups_expr: str
    cache: list[fx.Node]
    state: list[fx.Node]
    attentions: list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]
    layout: dict[fx.Node, dict[str, Any]]  # per cache node: kind, attention, positions (+ window, axis)


def _strip_views(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in VIEW_OPS:
        node = node.args[0]
    return node


def _attentions(a: Analysis) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node, bool]]:
    """(attention output, queries, raw K operand, V operand, is SDPA) for every SDPA and
    matmul-softmax-matmul pattern; for the latter the K operand is ``Kᵀ`` as the score matmul reads it."""
    found = []
    for node in a.gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == torch.ops.aten.scaled_dot_product_attention.default:
            found.append((node, node.args[0], node.args[1], node.args[2], True))
        elif node.target in SOFTMAX:
            cur = node.args[0]
            while cur.op == "call_function" and cur.target in SCORE_OPS:
                cur = next((x for x in cur.args if isinstance(x, fx.Node) and a.roles.get(x) != "const"
                            and a.roles.get(x) != "size"), cur.args[0])
            if cur.op != "call_function" or cur.target not in MATMUL:
                continue
            out = next((u for u in node.users if u.op == "call_function" and u.target in MATMUL and u.args[0] is node), None)
            if out is not None:
                found.append((out, cur.args[0], cur.args[1], out.args[1], False))
    return found


def find_attention(a: Analysis) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(attention node, queries, keys, values) for every SDPA and matmul-softmax-matmul pattern."""
    return [(node, q, k if sdpa else _strip_views(k), v) for node, q, k, v, sdpa in _attentions(a)]


def _kv_operands(a: Analysis) -> dict[fx.Node, tuple[str, int, fx.Node]]:
    """The exact K and V operands of every attention → (keys/values, key axis, attention node).

    ``matmul(q, Kᵀ)``: the key axis of ``Kᵀ`` is its last; ``matmul(p, V)`` and SDPA: the one
    before last."""
    out: dict[fx.Node, tuple[str, int, fx.Node]] = {}
    for node, _, k, v, sdpa in _attentions(a):
        out[k] = ("keys", len(k.meta["val"].shape) - (2 if sdpa else 1), node)
        out[v] = ("values", len(v.meta["val"].shape) - 2, node)
    return out


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


# requires() plans, then run() needs the same plan: the runner calls them back to back on one bundle,
# so the plan is kept for that bundle object (weakly: a later bundle at a reused id is not mistaken
# for it) and run() takes it out again. Planning analyses the whole graph; this halves the pass's cost.
_PLANNED: dict[int, tuple[weakref.ref[Bundle], Plan]] = {}


def plan(bundle: Bundle) -> Plan:
    """Find the sequence attention, check cacheability, and sort the boundary into cache and state."""
    held = _PLANNED.get(id(bundle))
    if held is not None and held[0]() is bundle:
        return held[1]
    p = _plan(bundle)
    _PLANNED.clear()
    _PLANNED[id(bundle)] = (weakref.ref(bundle), p)
    return p


def _plan(bundle: Bundle) -> Plan:
    seg = single_full_segment(bundle, "extract-kv-cache")
    seqs = [s for s in seg.inputs if s.role == "sequence"]
    if not seqs:
        raise PreconditionError(f"extract-kv-cache needs a behaviour-sequence input (role 'sequence'), found "
                                f"roles {sorted({s.role for s in seg.inputs})}", "name it seq_* or use --roles")
    seq = seqs[0]
    a = analyze(seg.program, seg.inputs)
    ph = a.placeholders[seq.name]
    attn = [t for t in find_attention(a) if any(ph in _ancestors(x) for x in t[1:])]
    if not attn:
        raise PreconditionError(f"extract-kv-cache found no attention over the sequence input {seq.name!r} "
                                f"({len(find_attention(a))} attention patterns in the graph)",
                                "this pass is for LONGER-style models; build without it")
    seq_symbols = _symbols(ph.meta["val"].shape[1:2])
    # BST: sequence positions are queries of an attention whose keys carry the candidate
    mixed = [t for t in attn if a.roles[t[2]] == "item" and ph in _ancestors(t[1])
             and seq_symbols & _symbols(t[1].meta["val"].shape)]
    if mixed or not any(_keys_cacheable(a, k, ph) for _, _, k, _ in attn):
        node, _, k, _ = (mixed or attn)[0]
        items = sorted(p.name for p in _ancestors(k) if p.op == "placeholder" and a.roles[p] == "item")
        raise PreconditionError(
            f"extract-kv-cache: in the sequence attention at {describe_node(node)} the behaviours attend to keys that "
            f"depend on item inputs {items}: the candidate sits inside the sequence's self-attention "
            "(BST-style), so every sequence position's output changes with the candidate and cannot be cached",
            "keep the candidate out of the sequence's attention (LONGER: sequence tokens never attend to it)")
    seq_len = _shape(ph)[1] if len(_shape(ph)) > 1 else None
    if seq_len is None or seq_len.isdigit():
        raise PreconditionError(f"extract-kv-cache needs a dynamic sequence axis on {seq.name!r}; the program "
                                f"has a static one ({seq_len})",
                                "export with dynamic_shapes giving the sequence axis a Dim (reference families do)")
    groups_expr = _per_position_expr(seq_len)
    cut = boundary(a)
    operands = _kv_operands(a)
    layout: dict[fx.Node, dict[str, Any]] = {}
    order = {t[0]: i for i, t in enumerate(attn)}  # the sequence attentions, in graph order
    for n in cut:
        kind, axis, at = operands.get(n, ("other", -1, None))
        entry = {"kind": kind, **({"attention": order[at]} if at in order else {})}
        if groups_expr in _shape(n):
            layout[n] = {**entry, "positions": "per-position"}
        elif at is not None and _seq_only(a, n, ph) and _shape(n)[axis].isdigit():
            layout[n] = {**entry, "positions": "window", "window": int(_shape(n)[axis]), "axis": axis}
    cache = [n for n in cut if n in layout]
    state = [n for n in cut if n not in cache]
    if not cache:
        raise PreconditionError(f"extract-kv-cache: no user-side tensor with a per-position sequence axis "
                                f"({groups_expr}) reaches the per-candidate side", "nothing to cache")
    return Plan(a, seq.name, groups_expr, cache, state, attn, layout)


def _seq_only(a: Analysis, node: fx.Node, seq_ph: fx.Node) -> bool:
    """Computed from the sequence input alone (and parameters; sizes are re-derived per segment):
    the same for every request of a user."""
    seen, stack, inputs = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen or a.roles.get(n) == "size":
            continue
        seen.add(n)
        if n.op == "placeholder":
            inputs.add(n)
        stack.extend(n.all_input_nodes)
    return inputs == {seq_ph}


def _keys_cacheable(a: Analysis, keys: fx.Node, seq_ph: fx.Node) -> bool:
    """The keys are user-side, or a concatenation (along the key axis) with a user-side block that
    comes from the sequence — as when a candidate's own K/V are joined to the cached ones. Keys
    projected from a tensor that already mixes sequence and candidate (BST) are neither."""
    if a.roles[keys] == "user":
        return True
    return keys.op == "call_function" and keys.target == torch.ops.aten.cat.default and any(
        a.roles.get(x) == "user" and seq_ph in _ancestors(x) for x in keys.all_input_nodes)


def _symbols(shape: Any) -> set[str]:
    """Names of the free symbols in a shape's symbolic sizes."""
    return {f.name for d in shape if isinstance(d, torch.SymInt) for f in d.node.expr.free_symbols}


def _shape(n: fx.Node) -> list[str]:
    return [expr(d) for d in n.meta["val"].shape]


def _per_position_expr(seq_expr: str) -> str:
    """``4*s12`` → ``s12`` (positions are merged groups of 4); ``s12`` → ``s12``."""
    head, star, tail = seq_expr.partition("*")
    return tail if star and head.isdigit() else seq_expr


def requires(bundle: Bundle) -> None:
    """A LONGER-style sequence attention whose K/V can be cached per user (see :func:`plan`)."""
    plan(bundle)


def extract_kv_cache(bundle: Bundle, options: Options) -> PassResult:
    """Split into cache / user / item segments and declare the per-user KV cache."""
    p = plan(bundle)
    _PLANNED.pop(id(bundle), None)
    a, seg = p.analysis, bundle.segments[0]
    multiples = dict(bundle.source.multiples)
    k = multiples.get("seq", ("groups", 1))[1]
    # with one item per position (K = 1) the seq and groups symbols are one: the cache axis is "groups"
    dims = {a.batch_expr: "users", _shape(a.placeholders[p.seq_input])[1]: "seq", p.groups_expr: "groups"}
    cache_specs = tuple(tensor_spec(n, f"cache_{i}", "cache", dims) for i, n in enumerate(p.cache))
    state_specs = tuple(tensor_spec(n, f"state_{i}", "state", dims) for i, n in enumerate(p.state))
    user_inputs = rename_batch(tuple(s for s in seg.inputs if s.user_side), "users")
    item_specs = rename_batch(tuple(s for s in seg.inputs if not s.user_side), "candidates")

    def builder_with_inputs(names: set[str]) -> tuple[SegmentBuilder, tuple[TensorSpec, ...]]:
        b = SegmentBuilder(a)
        used = tuple(s for s in user_inputs if s.name in names)
        for s in used:
            b.bind(a.placeholders[s.name], b.input(s.name, a.placeholders[s.name]))
        return b, used

    needed = {n.name for c in p.cache for n in _ancestors(c) if n.op == "placeholder"}
    cb, cache_inputs = builder_with_inputs(needed)
    cache_gm = cb.module(p.cache)
    segments_gm: list[tuple[str, fx.GraphModule, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = [
        ("cache", cache_gm, cache_inputs, cache_specs)]
    if p.state:
        needed_u = {n.name for s in p.state for n in _ancestors(s) if n.op == "placeholder"}
        ub, u_inputs = builder_with_inputs(needed_u)
        for node, spec in zip(p.cache, cache_specs):
            ub.bind(node, ub.input(spec.name, node))
        segments_gm.append(("user", ub.module(p.state), u_inputs + cache_specs, state_specs))
    ib = SegmentBuilder(a)
    per_user = [(n, s) for n, s in zip(p.cache + p.state, cache_specs + state_specs)]
    placeholders = [(n, ib.input(s.name, n, size_axes=[i for i, d in enumerate(s.shape) if d != "users"]))
                    for n, s in per_user]
    for s in item_specs:
        ib.bind(a.placeholders[s.name], ib.input(s.name, a.placeholders[s.name]))
    index = ib.input(USER_INDEX.name, [a.batch_expr])
    for node, ph in placeholders:
        ib.bind(node, gather_rows(ib, ph, batch_axis(node, a.batch_expr), index))
    item_inputs = cache_specs + state_specs + item_specs + (USER_INDEX,)
    outputs = rename_batch(seg.outputs, "candidates")
    segments_gm.append(("item", ib.module(a.outputs), item_inputs, outputs))

    request = bundle.source.example_request(2, 5, seed=CHECK_SEED)
    values: dict[str, np.ndarray] = {**request.user, **request.item, USER_INDEX.name: request.user_index}
    programs = {}
    minimums = dim_minimums(seg.program, dims)
    windows = {spec.name: p.layout[n] for n, spec in zip(p.cache, cache_specs) if p.layout[n]["positions"] == "window"}
    # the cache is per position: it takes any number of them (an append may add a single one), unless it
    # has window tensors (they read the last `window` positions: the model's bound stays); the user and
    # item segments keep the bounds the whole model proved (groups >= recent)
    cache_minimums = {"users": minimums.get("users", 1)}
    if windows:
        groups_min = minimums.get("groups", 1)
        cache_minimums.update(groups=groups_min, seq=max(minimums.get("seq", 1), groups_min * k))
    for name, gm, ins, outs in segments_gm:
        feeds = {s.name: values[s.name] for s in ins}
        programs[name] = export_segment(gm, ins, feeds, multiples, cache_minimums if name == "cache" else minimums)
        values.update(run_program(programs[name], feeds, outs))
    axes = {s.name: windows[s.name]["axis"] if s.name in windows else s.shape.index("groups") for s in cache_specs}
    from mixexport.verification.compare import DEFAULT_TOLERANCES

    append_atol = options.check_atol if bundle.precision == "fp32" else DEFAULT_TOLERANCES[bundle.precision][1]
    append = _append_check(programs["cache"], cache_inputs, cache_specs, axes, request, p.seq_input, k, append_atol,
                           windows, max(minimums.get("groups", 1), 2))
    layout = {spec.name: {key: v for key, v in p.layout[n].items() if key != "axis"}
              for n, spec in zip(p.cache, cache_specs)}
    cache = CacheSpec(name="kv", producer="cache", tensors=cache_specs, seq_axis=axes, input=p.seq_input,
                      items_per_position=k, appendable=append["appendable"],
                      bytes_per_position=sum(_bytes_per_position(s) for s in cache_specs if s.name not in windows),
                      layout=layout)
    new = tuple(Segment(name, name, ins, outs, program=programs[name]) for name, _, ins, outs in segments_gm)
    report = _report(p, seg, programs, segments_gm, request, cache, append, state_specs)
    return PassResult(bundle.replace(segments=new, caches=(cache,)), report)


def _bytes_per_position(spec: TensorSpec) -> int:
    return int(np.prod([d for d in spec.shape if isinstance(d, int)])) * np.dtype(spec.dtype).itemsize


def _append_check(program: Any, inputs: tuple[TensorSpec, ...], outs: tuple[TensorSpec, ...], axes: dict[str, int],
                  request: Any, seq_name: str, k: int, atol: float, windows: dict[str, dict[str, Any]],
                  min_positions: int) -> dict[str, Any]:
    """Per-position tensors of a window == concatenation of those of its two halves (at a group
    boundary), and window tensors of the second half == those of the whole?

    The window is one user's request row, its sequence redrawn (random ids of the input's
    vocabulary) when either half would hold fewer than ``min_positions`` positions (at least 2: a
    torch.export program takes no size-1 axis; window tensors need their window)."""
    feeds = {s.name: request.user[s.name][:1] for s in inputs}
    seq = feeds[seq_name]
    half = max([min_positions] + [w["window"] for w in windows.values()])
    if seq.shape[1] // k < 2 * half:
        seq = feeds[seq_name] = random_ids(next(s for s in inputs if s.name == seq_name), (1, 2 * half * k),
                                           np.random.default_rng(17))
    cut = (seq.shape[1] // k // 2) * k
    whole = run_program(program, feeds, outs)
    first = run_program(program, {**feeds, seq_name: seq[:, :cut]}, outs)
    second = run_program(program, {**feeds, seq_name: seq[:, cut:]}, outs)
    diffs = {s.name: float(np.max(np.abs((second[s.name] if s.name in windows else
                                          np.concatenate([first[s.name], second[s.name]], axis=axes[s.name]))
                                         - whole[s.name]))) for s in outs}
    diff = max(diffs.values())
    ok = diff <= atol
    moved = sorted(n for n, d in diffs.items() if d > atol)
    return {"appendable": ok, "max_abs_diff": diff, "split_at_item": cut, "window_items": int(seq.shape[1]),
            **({"window_tensors": sorted(windows)} if windows else {}),
            "reason": "K/V of a position depend only on that position" if ok else
            f"the cache of a position depends on other positions ({', '.join(moved)} changed: e.g. self-attention "
            "over the sequence, absolute positions or a sequence-wide normalisation): appending would need a full "
            "recompute"}


def _report(p: Plan, seg: Segment, programs: dict[str, Any], segments_gm: list[Any], request: Any,
            cache: CacheSpec, append: dict[str, Any],
            state_specs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    values: dict[str, np.ndarray] = {**{k: v[:1] for k, v in request.user.items()},
                                     **{k: v[:1] for k, v in request.item.items()},
                                     USER_INDEX.name: np.zeros(1, dtype=np.int64)}
    flops = {}
    for name, _, ins, outs in segments_gm:
        feeds = {s.name: values[s.name] for s in ins}
        flops[name] = segment_flops(programs[name], feeds)
        values.update(run_program(programs[name], feeds, outs))
    full = segment_flops(seg.program, {k: v[:1] for k, v in request.rows().items()})
    seq_len = request.user[p.seq_input].shape[1]
    positions = seq_len // cache.items_per_position
    per_user = flops["cache"] + flops.get("user", 0)
    window_bytes = sum(_bytes_per_position(t) for t in cache.tensors if cache.layout[t.name]["positions"] == "window")
    return {
        "cache": {"tensors": [t.to_json() for t in cache.tensors], "axes": cache.seq_axis, "layout": cache.layout,
                  "bytes_per_position": cache.bytes_per_position, "window_bytes_per_user": window_bytes,
                  "bytes_per_user_at_sample": cache.bytes_per_position * positions + window_bytes,
                  "sample_seq_len": seq_len},
        "state": [s.to_json() for s in state_specs],
        "append": append, "attention_patterns": len(p.attentions),
        "flops": {"cache_per_user": flops["cache"], "user_per_user": flops.get("user", 0),
                  "item_per_candidate": flops["item"], "unsplit_per_row": full},
        "predicted_speedup": {str(n): {"vs_unsplit_on_miss": n * full / (per_user + n * flops["item"]),
                                       "hit_vs_miss": (per_user + n * flops["item"]) /
                                       (flops.get("user", 0) + n * flops["item"])} for n in PREDICT_AT},
    }


def ensures(before: Bundle, after: Bundle, options: Options) -> dict[str, Any]:
    """The cache, user and item segments composed reproduce the unsplit program (``check_atol``)."""
    request = before.source.example_request(2, 5, seed=CHECK_SEED)
    return {"check_max_abs_diff": check_composition("extract-kv-cache", before, after, options.check_atol, request)}


PASS = PassInfo(name="extract-kv-cache", stage="program", run=extract_kv_cache, options=Options, requires=requires,
                ensures=ensures)

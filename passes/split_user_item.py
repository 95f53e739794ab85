"""``split-user-item`` (UG-Sep serving): compute user-side work once per user, not once per candidate.

Cases handled:
- roles are propagated through the ``torch.export`` graph: a node is user-side when every tensor
  it reads is user-side (user or sequence inputs), a parameter or a constant;
- the **user segment** takes the user inputs (leading dim ``users``) and outputs every user-side
  value an item-side node reads ("user state") — for UG-Sep that is the user tokens' slices and
  the compensation term of **every layer** (the cut is per layer), plus the user part of the head;
  for UI-MixFormer the user heads (Query Mixer, cross attention, output fusion) and the sequence's
  per-head K/V of every layer stay in the user segment, and the item heads read the user heads'
  slices and the item heads' K/V of every layer;
- the **item segment** takes that state (leading dim ``users``), the item inputs and
  ``user_index [candidates]``, and broadcasts the state to the candidates **inside** the graph
  (a gather by ``user_index`` along each state's batch axis; U = 1 is the 1 user × N case);
- symbolic sizes are re-derived per segment, so the batch symbol means U users in the user segment
  and N candidates in the item segment;
- the split is proven after the pass (its ``ensures``, run by the pipeline): the two segments
  composed on a sample request must reproduce the unsplit program (``check_atol``), or the build
  fails as a check (exit 1); the build's stage ledger and ``verify`` repeat that against the eager
  model.

Models that are not mixers split the same way when their user side does real work before it meets
the candidate: a DIN's user tower and the embeddings and mask of its behaviour history become the
user segment, its target attention (which reads the candidate) the item segment; a two-tower model's
user tower is the user segment and the item tower with the dot product the item segment. Models that
join user and item features before any matrix multiply (DeepFM's stacked fields, DCN-v2's ``x_0``,
MMoE/PLE's shared input, BST's candidate inside the sequence) are refused, naming the edge.

Report: FLOPs per user (user segment), per candidate (item segment) and per row (unsplit); the
boundary tensors with their bytes per user; the predicted speed-up ``N·F / (F_user + N·F_item)``
at N ∈ {1, 16, 64, 256, 1024}; ``sparse_reads``: every TopK-selected memory read (a TopK whose
indices reach a Gather/embedding lookup, as in MSN's product-key memory) with the side it runs on —
``user`` (its query reads only user inputs: it moves into the user segment and runs once per user)
or ``item`` (its query reads the candidate: it stays per candidate).

Precondition: the program has one full segment with user and item inputs, and some matrix
multiply is user-only and reads the user (profile) features — user-only work on the behaviour
sequence alone is ``extract-kv-cache``'s. A model whose user features meet item features before any
matrix multiply (plain RankMixer tokenization; plain MixFormer, whose heads are cut from user and
item features together) has nothing to reuse; the error names the edge where they meet.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mixexport.bundle import Bundle, Segment
from mixexport.errors import PreconditionError
from mixexport.partition import (PREDICT_AT, USER_INDEX, Analysis, SegmentBuilder, analyze, batch_axis, boundary,
                                 check_composition, describe_node, export_segment, gather_rows, predicted_speedup,
                                 rename_batch, role_flops, run_program, segment_flops, single_full_segment,
                                 tensor_spec)
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.options import SplitUserItemOptions as Options
from mixexport.specs import TensorSpec

MATMUL_TARGETS = {torch.ops.aten.matmul.default, torch.ops.aten.linear.default, torch.ops.aten.mm.default,
                  torch.ops.aten.bmm.default, torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default,
                  torch.ops.aten.scaled_dot_product_attention.default}
CHECK_SEED = 11  # the sample request (2 users x 5 candidates) the segments are exported and checked on



def requires(bundle: Bundle) -> None:
    """One full program segment with user and item inputs, and a user-only matrix multiply that
    reads the user features.

    The rule is structural: a matrix multiply is user-only when every tensor it reads depends on
    user-side inputs alone (roles user/sequence), and it counts only if it depends on a ``user``
    input (the profile features), not on the sequence alone. A model whose user features meet item
    features before any matrix multiply (RankMixer's joint tokenization, plain MixFormer's heads cut
    from user and item features together) has no user computation to reuse: its only user-only work
    would be the behaviour sequence's, which is what ``extract-kv-cache`` serves. The error names
    the edge where the user features first meet item data. A program without ``user`` inputs (only
    a sequence on the user side) needs any user-only matrix multiply.
    """
    seg = single_full_segment(bundle, "split-user-item")
    a = analyze(seg.program, seg.inputs)
    profile = sorted(s.name for s in seg.inputs if s.role == "user")
    reads = user_input_reads(a)
    user_matmuls = [n for n, r in a.roles.items() if r == "user" and n.op == "call_function"
                    and n.target in MATMUL_TARGETS]
    reusable = [n for n in user_matmuls if not profile or reads[n] & set(profile)]
    if reusable:
        return
    sources = set(profile) or {s.name for s in seg.inputs if s.user_side}
    edge = next(((n, u) for n in boundary(a) if reads.get(n, set()) & sources
                 for u in a.consumers(n) if a.roles.get(u) == "item"), None)
    where = (f"user inputs meet item inputs at {describe_node(edge[1])}, which reads the user-side "
             f"{edge[0].name}: that edge makes the user side depend on items" if edge is not None
             else "no user-side value")
    n_user = sum(1 for n in reads if reads[n] & sources)
    seq_only = len(user_matmuls) - len(reusable)
    also = (f"; the {seq_only} user-only matrix multiplies read the sequence alone "
            f"({', '.join(sorted(set().union(*(reads[n] for n in user_matmuls))))}): that part is "
            "extract-kv-cache's" if seq_only else "")
    sparse = "".join(f"; the memory read at {r['topk']} is {r['side']}-side" for r in _sparse_reads(a))
    raise PreconditionError(
        f"split-user-item needs user-only computation past the embeddings (user tokens kept in their "
        f"own tensors, as in UG-Sep or UI-MixFormer's user heads, a two-tower user tower or a DIN's user "
        f"tower and history); found {n_user} user-side ops reading "
        f"the user inputs {sorted(sources)} and none is a matrix multiply: {where}{also}{sparse}",
        "use a model whose user tokens stay separate (family ugsep, or mixformer with ui=true; in your own "
        "model, a user tower that runs before user and item features are joined), or build without this pass")


def predict(bundle: Bundle) -> dict[str, Any]:
    """What the split would save, without cutting the graph (``mixexport inspect``): FLOPs per user
    (the user-side nodes) and per candidate (the item-side ones) on one sample row, their share, and
    the predicted speed-up ``N·F / (F_user + N·F_item)`` at N ∈ PREDICT_AT, the formula the pass's
    report uses on the segments it cut. Call it where :func:`requires` holds."""
    seg = bundle.segments[0]
    a = analyze(seg.program, seg.inputs)
    rows = {k: v[:1] for k, v in bundle.source.example_request(1, 1, seed=CHECK_SEED).rows().items()}
    flops = role_flops(a, rows)
    f_full = sum(flops.values())
    return {"flops_per_row_unsplit": f_full, "flops_per_user": flops["user"],
            "flops_per_candidate": flops["item"] + flops["const"],
            "user_share_of_flops": flops["user"] / f_full if f_full else 0.0,
            "boundary_tensors": len(boundary(a)),
            "predicted_speedup": predicted_speedup(f_full, flops["user"], flops["item"] + flops["const"], PREDICT_AT)}


def user_input_reads(a: Analysis) -> dict[Any, set[str]]:
    """For every user-side node, the user-side inputs (by name) it depends on."""
    reads: dict[Any, set[str]] = {}
    for node in a.gm.graph.nodes:
        role = a.roles.get(node)
        if role != "user":
            continue
        if node.op == "placeholder":
            reads[node] = {node.name}
        else:
            reads[node] = set().union(*(reads.get(x, set()) for x in node.all_input_nodes))
    return reads


def split_user_item(bundle: Bundle, options: Options) -> PassResult:
    """Cut the program into a user segment (once per user) and an item segment (per candidate)."""
    seg = bundle.segments[0]
    a = analyze(seg.program, seg.inputs)
    cut = boundary(a)
    user_specs = rename_batch(tuple(s for s in seg.inputs if s.user_side), "users")
    item_specs = rename_batch(tuple(s for s in seg.inputs if not s.user_side), "candidates")
    state_specs = tuple(tensor_spec(n, f"state_{i}", "state", {a.batch_expr: "users"}) for i, n in enumerate(cut))

    ub = SegmentBuilder(a)
    for s in user_specs:
        ub.bind(a.placeholders[s.name], ub.input(s.name, a.placeholders[s.name]))
    user_gm = ub.module(cut)

    ib = SegmentBuilder(a)
    states = [(n, ib.input(s.name, n, size_axes=[i for i in range(len(s.shape)) if s.shape[i] != "users"]))
              for n, s in zip(cut, state_specs)]
    for s in item_specs:
        ib.bind(a.placeholders[s.name], ib.input(s.name, a.placeholders[s.name]))
    index = ib.input(USER_INDEX.name, [a.batch_expr])
    for node, ph in states:
        ib.bind(node, gather_rows(ib, ph, batch_axis(node, a.batch_expr), index))
    item_gm = ib.module(a.outputs)

    request = bundle.source.example_request(2, 5, seed=CHECK_SEED)
    user_feeds = {s.name: request.user[s.name] for s in user_specs}
    user_ep = export_segment(user_gm, user_specs, user_feeds)
    state = run_program(user_ep, user_feeds, state_specs)
    item_feeds = {**state, **{s.name: request.item[s.name] for s in item_specs}, USER_INDEX.name: request.user_index}
    item_inputs = state_specs + item_specs + (USER_INDEX,)
    item_ep = export_segment(item_gm, item_inputs, item_feeds)
    outputs = rename_batch(seg.outputs, "candidates")
    report = _report(a, seg, user_ep, item_ep, user_specs, item_inputs, state_specs, cut, request)
    new = (Segment("user", "user", user_specs, state_specs, program=user_ep),
           Segment("item", "item", item_inputs, outputs, program=item_ep))
    return PassResult(bundle.replace(segments=new), report)


def _report(a: Analysis, seg: Segment, user_ep: Any, item_ep: Any, user_specs: tuple[TensorSpec, ...],
            item_inputs: tuple[TensorSpec, ...], state_specs: tuple[TensorSpec, ...], cut: list[Any],
            request: Any) -> dict[str, Any]:
    one = bundle_rows = request.rows()
    one = {k: v[:1] for k, v in bundle_rows.items()}
    f_full = segment_flops(seg.program, one)
    user_one = {s.name: request.user[s.name][:1] for s in user_specs}
    f_user = segment_flops(user_ep, user_one)
    state = run_program(user_ep, user_one, state_specs)
    item_one = {**state, **{s.name: request.item[s.name][:1] for s in item_inputs if s.name in request.item},
                "user_index": np.zeros(1, dtype=np.int64)}
    f_item = segment_flops(item_ep, item_one)
    per_user_bytes = {s.name: int(np.prod([d for d in s.shape if isinstance(d, int)])) * np.dtype(s.dtype).itemsize
                      for s in state_specs}
    return {
        "flops_per_row_unsplit": f_full, "flops_per_user": f_user, "flops_per_candidate": f_item,
        "user_share_of_flops": f_user / f_full if f_full else 0.0,
        "boundary": [{"name": s.name, "from_node": n.name, "shape": list(s.shape), "dtype": s.dtype,
                      "bytes_per_user": per_user_bytes[s.name]} for s, n in zip(state_specs, cut)],
        "boundary_bytes_per_user": sum(per_user_bytes.values()),
        "predicted_speedup": predicted_speedup(f_full, f_user, f_item),
        "sparse_reads": _sparse_reads(a),
    }


TOPK = torch.ops.aten.topk.default
LOOKUPS = {torch.ops.aten.embedding.default, torch.ops.aten.index_select.default, torch.ops.aten.index.Tensor}


def _sparse_reads(a: Analysis) -> list[dict[str, Any]]:
    """TopK-selected table reads (MSN's memory): the first TopK of each read and the side its query is on.

    A read is a Gather/embedding lookup of a parameter whose indices descend from TopK outputs; its
    side is the role of the TopK that starts it (``user``: the read moves into the user segment).
    """
    reads: dict[str, dict[str, Any]] = {}
    order = {n: i for i, n in enumerate(a.roles)}
    for node in a.roles:
        if node.op != "call_function" or node.target not in LOOKUPS:
            continue
        stack, seen, topks = list(node.all_input_nodes), set(), []
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target == TOPK:
                topks.append(n)
            stack.extend(n.all_input_nodes)
        if topks:
            first = min(topks, key=lambda t: order.get(t, 0))
            side = "user" if all(a.roles.get(t) == "user" for t in topks) else "item"
            reads[node.name] = {"lookup": node.name, "topk": first.name, "topks": len(topks), "side": side,
                                "segment": "user" if side == "user" else "item"}
    return list(reads.values())


def ensures(before: Bundle, after: Bundle, options: Options) -> dict[str, Any]:
    """The user and item segments composed reproduce the unsplit program (``check_atol``)."""
    request = before.source.example_request(2, 5, seed=CHECK_SEED)
    return {"check_max_abs_diff": check_composition("split-user-item", before, after, options.check_atol, request)}


PASS = PassInfo(name="split-user-item", stage="program", run=split_user_item, options=Options, requires=requires,
                ensures=ensures)

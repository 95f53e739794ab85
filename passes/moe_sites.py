"""Sparse-MoE sites in a ``torch.export`` program, for ``pack-moe-experts``: where a Python list of
expert MLPs reads one token tensor, each output is weighted by a column of one gate tensor and the
products are summed (see :func:`mixexport.passes.pack_moe_experts.pack_moe_experts` for the cases
handled). :func:`find_sites` returns every site it can pack, and for every module list it looked at
and cannot pack, the reason. Matching only; the rewrite is the pass's.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten
ACTIVATIONS = (aten.gelu.default, aten.relu.default, aten.silu.default)
_MEMBER = re.compile(r"^(?P<list>.+)\.(?P<idx>\d+)$")


@dataclass
class Expert:
    root: str                       # module path, e.g. blocks.0.ffn.experts.2
    kind: str                       # "mlp" | "swiglu"
    x: fx.Node                      # the token input it reads
    output: fx.Node
    weights: dict[str, torch.Tensor | None]   # w_in, b_in, w_up, w_out, b_out
    act: tuple[Any, tuple[Any, ...], dict[str, Any]] | None = None   # (aten op, extra args, kwargs)

    def signature(self) -> tuple[Any, ...]:
        shapes = tuple((k, None if w is None else tuple(w.shape)) for k, w in sorted(self.weights.items()))
        act = None if self.act is None else (str(self.act[0]), self.act[1], tuple(sorted(self.act[2].items())))
        return self.kind, shapes, act


@dataclass
class Site:
    path: str                       # the MoE module, e.g. blocks.0.ffn
    members: str                    # the expert list, e.g. blocks.0.ffn.experts
    x: fx.Node
    gates: fx.Node                  # G [T,B,R]
    experts: list[Expert]           # always-on (shared) experts first, then routed in gate-column order
    shared: int
    root: fx.Node                   # the add whose value the packed module replaces
    extras: list[fx.Node] = field(default_factory=list)
    routing: str = ""


def _path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _tensor(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _param(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def _fits(bias: torch.Tensor | None, shape: tuple[int, int, int]) -> bool:
    """No bias, or one that broadcasts to ``shape`` = [T, 1, O] without growing it."""
    try:
        return bias is None or tuple(torch.broadcast_shapes(bias.shape, shape)) == shape
    except RuntimeError:
        return False


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _bias(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor | None]:
    """``node + param`` → (the add, the param); otherwise (node, None)."""
    user = _only_user(node)
    if user is not None and user.target == aten.add.Tensor and len(user.args) == 2:
        other = user.args[1] if user.args[0] is node else user.args[0]
        b = _param(gm, other)
        if b is not None:
            return user, b
    return node, None


def _inputs(nodes: list[fx.Node]) -> set[fx.Node]:
    """The tensors ``nodes`` read from outside, parameters excluded."""
    inside = set(nodes)
    return {a for n in nodes for a in n.all_input_nodes
            if a not in inside and a.op != "get_attr" and _tensor(a) is not None}


def _match_expert(gm: fx.GraphModule, root: str, nodes: list[fx.Node]) -> Expert | str:
    """An MLP or SwiGLU expert made of exactly ``nodes``, or why not."""
    inside = set(nodes)
    inputs = _inputs(nodes)
    if len(inputs) != 1:
        return f"{root} reads {len(inputs)} tensors, an expert reads one token tensor"
    x = inputs.pop()
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        return f"{root} has {len(outputs)} outputs, an expert has one"
    xt = _tensor(x)
    first = [n for n in nodes if n.target == aten.matmul.default and n.args[0] is x]
    ws = [_param(gm, n.args[1]) for n in first]
    if not first or any(w is None or w.ndim != 3 for w in ws) or xt is None or xt.ndim != 3:
        return f"{root} does not start with per-token MatMuls x[T,B,I] @ W[T,I,O] on its input"
    seen: set[fx.Node] = set(first)
    if len(first) == 1:                                  # MLP: act(x@W1 + b1) @ W2 + b2
        h, b_in = _bias(gm, first[0])
        act = _only_user(h)
        if act is None or act.target not in ACTIVATIONS:
            return f"{root}: the first MatMul does not feed a GELU/ReLU/SiLU"
        mm = _only_user(act)
        w_out = _param(gm, mm.args[1]) if mm is not None and mm.target == aten.matmul.default else None
        if mm is None or w_out is None or w_out.ndim != 3:
            return f"{root}: the activation does not feed a per-token MatMul"
        y, b_out = _bias(gm, mm)
        t, _, hidden = ws[0].shape                       # type: ignore[union-attr]
        if not (_fits(b_in, (t, 1, hidden)) and _fits(b_out, (t, 1, w_out.shape[-1]))):
            return f"{root}: a bias does not broadcast as a per-token bias [T, 1, O]"
        seen |= {h, act, mm, y}
        expert = Expert(root, "mlp", x, y, {"w_in": ws[0], "b_in": b_in, "w_up": None, "w_out": w_out,
                                            "b_out": b_out}, (act.target, tuple(act.args[1:]), dict(act.kwargs)))
    elif len(first) == 2:                                # SwiGLU: (silu(x@Wg) * (x@Wu)) @ Wd
        silus = [i for i, n in enumerate(first) if (u := _only_user(n)) is not None and u.target == aten.silu.default]
        if len(silus) != 1:
            return f"{root}: two MatMuls on the input but not exactly one feeds a SiLU"
        g = silus[0]
        silu, up = _only_user(first[g]), first[1 - g]
        mul = _only_user(silu)
        if mul is None or mul.target != aten.mul.Tensor or set(mul.args) != {silu, up} or _only_user(up) is not mul:
            return f"{root}: SiLU(x@Wg) is not multiplied by x@Wu"
        mm = _only_user(mul)
        w_out = _param(gm, mm.args[1]) if mm is not None and mm.target == aten.matmul.default else None
        if mm is None or w_out is None or w_out.ndim != 3:
            return f"{root}: the SwiGLU product does not feed a per-token MatMul"
        y = mm
        seen |= {silu, mul, mm}
        expert = Expert(root, "swiglu", x, y, {"w_in": ws[g], "b_in": None, "w_up": ws[1 - g], "w_out": w_out,
                                                "b_out": None})
    else:
        return f"{root}: {len(first)} MatMuls read the input; an MLP has 1, a SwiGLU 2"
    if seen != inside or y is not outputs[0]:
        extra = sorted(str(n.target) for n in inside - seen)
        return f"{root}: ops besides the expert pattern ({', '.join(extra[:4]) or 'output in the middle'})"
    return expert


def _gate_column(expert: Expert) -> tuple[fx.Node, fx.Node, int] | str:
    """(gate tensor G, the Mul, column) for ``G[..., c:c+1] * expert(x)``, or why not."""
    mul = _only_user(expert.output)
    if mul is None or mul.target != aten.mul.Tensor or len(mul.args) != 2:
        return f"{expert.root}: its output is not multiplied by a gate only"
    sl = mul.args[1] if mul.args[0] is expert.output else mul.args[0]
    st = _tensor(sl) if isinstance(sl, fx.Node) else None
    if st is not None and sl.target != aten.slice.Tensor and st.ndim >= 2 and st.shape[-1] == 1:
        return sl, mul, 0   # G[..., 0:1] of a one-column G: torch.export drops the no-op slice
    if not (isinstance(sl, fx.Node) and sl.target == aten.slice.Tensor):
        return f"{expert.root}: the gate is not a column slice G[..., c:c+1]"
    g, dim, start, end = (list(sl.args) + [None] * 4)[:4]
    step = sl.args[4] if len(sl.args) > 4 else 1
    gt = _tensor(g)
    if gt is None or dim not in (-1, gt.ndim - 1) or not isinstance(start, int) or end != start + 1 or step != 1:
        return f"{expert.root}: the gate is not a column slice G[..., c:c+1]"
    return g, mul, start


def _add_leaves(node: fx.Node, path: str, out: list[fx.Node]) -> None:
    if node.target == aten.add.Tensor and within(_path(node), path) and len(node.args) == 2 \
            and all(isinstance(a, fx.Node) for a in node.args):
        for a in node.args:
            if a.target == aten.add.Tensor and len(a.users) > 1:
                out.append(a)
            else:
                _add_leaves(a, path, out)
    else:
        out.append(node)


def _routing(gates: fx.Node, x: fx.Node) -> str:
    """The ops computing the gates from ``x``, router MatMul included: e.g. ``matmul→add→relu``."""
    seen: set[fx.Node] = set()
    stack = [gates]
    while stack:
        node = stack.pop()
        if node in seen or node is x or node.op != "call_function":
            continue
        seen.add(node)
        if node.target != aten.matmul.default:      # stop at the router
            stack.extend(node.all_input_nodes)
    return "→".join(str(n.target).replace("aten.", "").split(".")[0] for n in gates.graph.nodes
                    if n in seen and n.target is not operator.getitem)


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[str]]:
    """Every packable MoE site of ``gm`` and, for module lists that are not one, the reason."""
    members: dict[str, dict[int, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        parts = _path(node).split(".")
        for i in range(1, len(parts) + 1):
            m = _MEMBER.match(".".join(parts[:i]))
            if m:
                members.setdefault(m["list"], {}).setdefault(int(m["idx"]), []).append(node)
    sites, reasons = [], []
    for name, group in members.items():
        result = _match_site(gm, name, group)
        if len(group) < 2 and not (isinstance(result, Site) and result.shared):
            continue  # one routed expert is a MoE only beside an always-on one (E = 2, top-k = 2)
        (sites.append if isinstance(result, Site) else reasons.append)(result)
    return sites, reasons


def _match_site(gm: fx.GraphModule, name: str, group: dict[int, list[fx.Node]]) -> Site | str:
    label = f"{name}.[{min(group)}-{max(group)}]"
    inputs = [_inputs(nodes) for nodes in group.values()]
    if any(len(i) != 1 for i in inputs) or len(set().union(*inputs)) != 1:
        return f"{label}: the members do not all read one shared input (not parallel experts)"
    matched = [_match_expert(gm, f"{name}.{j}", group[j]) for j in sorted(group)]
    experts = [e for e in matched if isinstance(e, Expert)]
    if len(experts) != len(matched):
        return f"{label}: {next(e for e in matched if isinstance(e, str))}"
    columns = [_gate_column(e) for e in experts]
    gated = [g for g in columns if not isinstance(g, str)]
    if len(gated) != len(columns):
        return f"{label}: {next(g for g in columns if isinstance(g, str))}"
    gates = {g[0] for g in gated}
    cols = [g[2] for g in gated]
    gt = _tensor(next(iter(gates)))
    if len(gates) != 1 or gt is None or sorted(cols) != list(range(gt.shape[-1])):
        return f"{label}: the gates are not the columns 0..E-1 of one gate tensor"
    site_path = name.rsplit(".", 1)[0] if "." in name else ""
    muls = {g[1] for g in gated}
    root = next(iter(muls))
    while (u := _only_user(root)) is not None and u.target == aten.add.Tensor and within(_path(u), site_path):
        root = u
    leaves: list[fx.Node] = []
    _add_leaves(root, site_path, leaves)
    if not muls <= set(leaves):
        return f"{label}: the gated expert outputs are not summed by one chain of adds"
    x = experts[0].x
    shared: list[Expert] = []
    extras: list[fx.Node] = []
    for leaf in (n for n in leaves if n not in muls):
        # an addend computed by another module of the site on the same x: a shared expert?
        rest = _path(leaf)[len(site_path) + 1:].split(".")[0] if within(_path(leaf), site_path) else ""
        module = f"{site_path}.{rest}"
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and within(_path(n), module)] if rest else []
        cand = _match_expert(gm, module, nodes) if nodes else "not a module"
        if isinstance(cand, Expert) and cand.output is leaf and cand.x is x \
                and cand.signature() == experts[0].signature():
            shared.append(cand)
        else:
            extras.append(leaf)
    routed = [e for _, e in sorted(zip(cols, experts), key=lambda p: p[0])]
    if len({e.signature() for e in routed}) != 1:
        return f"{label}: the experts differ in structure or weight shapes"
    gate_node = next(iter(gates))
    return Site(site_path, name, x, gate_node, shared + routed, len(shared), root, extras,
                _routing(gate_node, x))

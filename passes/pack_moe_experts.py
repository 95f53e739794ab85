"""``pack-moe-experts`` (program stage): a Sparse-MoE written as a Python list of expert MLPs plus a
router becomes stacked expert weights run as a few batched MatMuls with static shapes.

``torch.export`` unrolls a researcher's ``for j, expert in enumerate(self.experts): out = out +
gates[..., j:j+1] * expert(x)`` into ``E`` parallel MatMul chains on one token tensor, each
multiplied by a slice of the gate tensor and summed (``models/rankmixer_moe.py``,
``models/tokenmixer_large.py``). This pass finds those sites in the ``torch.export`` program and
replaces each with one :class:`PackedExperts` module, then re-exports the program with the
segment's dynamic dims. The router nodes are kept as they are; the
packed form applies their gates by **dense masking**, so the result is exact for any gating and the
exported graph has no NonZero, Loop, If or data-dependent shape.

Forms (``Options.form``):
- ``hidden-slice`` (default): the experts' hidden dims are concatenated, ``W1 [T, I, E·h]``,
  ``W2 [T, E·h, O]``, and the gate multiplies each expert's hidden slice:
  ``y = (act(x@W1 + b1) ⊙ expand(g)) @ W2 + g@B2`` with ``B2 [T, E, O]`` — exact, because ``W2``
  is linear; two (MLP) or three (SwiGLU) large GEMMs instead of ``2E``/``3E`` small ones.
- ``stacked``: ``W1 [E, T, I, h]``, ``W2 [E, T, h, O]``; one batched GEMM per layer over all experts,
  then ``Σ_e g_e·y_e`` as Mul + ReduceSum (the spec's exact baseline; no Einsum).
Both compute every expert (dense FLOPs), like the unpacked graph. Skipping zero-gate experts needs
a data-dependent shape, or a capacity that can overflow (ReLU routing has no bound on the active
count), so it is not done. What packing buys is op count (2-3 large GEMMs per site instead of
2E-3E small ones: kernel launches on GPU, one weight per site for W8A16). It is not a CPU speed-up:
at batch 256 on 2 cores the unpacked MatMuls already run near the cores' peak, and the packed forms
measure equal (TokenMixer-Large) to 10-40% slower (RankMixer-MoE: the activation and gate multiply
now stream one hidden tensor too large for the cache); see ``benchmarks/moe_pack.py``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from mixexport.bundle import Bundle
from mixexport.errors import PreconditionError
from mixexport.passes import PassInfo, PassResult
from mixexport.passes.moe_sites import Expert, Site, find_sites, within
from mixexport.passes.options import PackMoeExpertsOptions as Options
from mixexport.specs import TensorSpec

aten = torch.ops.aten


class PackedExperts(nn.Module):
    """The experts of one site packed: ``forward(x [T,B,I], gates [T,B,R]) -> [T,B,O]``."""

    def __init__(self, form: str, experts: list[Expert], shared: int) -> None:
        super().__init__()
        self.form, self.kind, self.shared, self.num = form, experts[0].kind, shared, len(experts)
        self.act = experts[0].act
        tokens = experts[0].weights["w_out"].shape[0]       # type: ignore[union-attr]

        def pack(key: str, axis: int) -> nn.Parameter | None:
            if experts[0].weights[key] is None:
                return None
            # biases as [T,1,O] (what _fits admitted), so both forms broadcast them per token
            ws = [w if key[0] == "w" else w.expand(tokens, 1, w.shape[-1])  # type: ignore[union-attr]
                  for w in (e.weights[key] for e in experts)]
            stacked = torch.stack(ws, 0) if form == "stacked" else torch.cat(ws, axis)  # type: ignore[arg-type]
            return nn.Parameter(stacked, requires_grad=False)

        self.w_in = pack("w_in", -1)      # [T,I,E·h]  | [E,T,I,h]
        self.b_in = pack("b_in", -1)      # [T,1,E·h]  | [E,T,1,h]
        self.w_up = pack("w_up", -1)      # [T,I,E·h]  | [E,T,I,h]   (SwiGLU)
        self.w_out = pack("w_out", -2)    # [T,E·h,O]  | [E,T,h,O]
        self.b_out = pack("b_out", 1)     # [T,E,O]    | [E,T,1,O]

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return F.silu(torch.matmul(x, self.w_in)) * torch.matmul(x, self.w_up)
        h = torch.matmul(x, self.w_in)
        op, args, kwargs = self.act   # type: ignore[misc]
        return op(h if self.b_in is None else h + self.b_in, *args, **kwargs)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        if self.shared:                                       # always-on experts: gate 1
            ones = torch.ones_like(gates[..., :1])
            gates = torch.cat([ones] * self.shared + [gates], -1)          # [T,B,E]
        if self.form == "stacked":
            y = torch.matmul(self._hidden(x.unsqueeze(0)), self.w_out)    # [E,T,B,O]
            y = y if self.b_out is None else y + self.b_out
            return (y * gates.permute(2, 0, 1).unsqueeze(-1)).sum(0)       # [T,B,O]
        h = self._hidden(x)                                               # [T,B,E·h]
        h = (h.unflatten(-1, (self.num, -1)) * gates.unsqueeze(-1)).flatten(-2)
        y = torch.matmul(h, self.w_out)                                   # [T,B,O]
        return y if self.b_out is None else y + torch.matmul(gates, self.b_out)

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(p.shape) for k, p in self.named_parameters()}


def _op_counts(graph: fx.Graph) -> dict[str, int]:
    hist = Counter(str(n.target).replace("aten.", "") for n in graph.nodes if n.op == "call_function")
    return dict(sorted(hist.items()))


def _rewrite(gm: fx.GraphModule, site: Site, form: str, index: int) -> PackedExperts:
    packed = PackedExperts(form, site.experts, site.shared)
    target = f"{site.path}.packed_experts" if site.path else f"packed_experts_{index}"
    gm.add_submodule(target, packed)
    with gm.graph.inserting_before(site.root):
        new = gm.graph.call_module(target, (site.x, site.gates))
        for extra in site.extras:
            new = gm.graph.call_function(aten.add.Tensor, (new, extra))
    site.root.replace_all_uses_with(new)
    return packed


def _example_feeds(specs: tuple[TensorSpec, ...]) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, Any]]]:
    """Valid random inputs and the dynamic-shape spec: one ``Dim`` per symbolic dim name."""
    rng = np.random.default_rng(0)
    names = sorted({d for s in specs for d in s.shape if isinstance(d, str)})
    sizes = dict(zip(names, (5, 7, 11, 13, 17, 19)))   # odd, distinct: no 0/1 or equality specialisation
    dims = {n: torch.export.Dim(n, min=1) for n in names}
    feeds, dynamic = {}, {}
    for s in specs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in s.shape)
        if s.dtype.startswith("int"):
            high = np.broadcast_to(np.asarray(s.vocab if s.vocab is not None else 1), shape)
            feeds[s.name] = torch.from_numpy((rng.random(shape) * high).astype(s.dtype))
        else:
            feeds[s.name] = torch.from_numpy(rng.standard_normal(shape).astype(s.dtype))
        dynamic[s.name] = {i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)}
    return feeds, dynamic


def pack_moe_experts(bundle: Bundle, options: Options) -> PassResult:
    """Pack every Sparse-MoE site of every program segment into stacked expert weights (form per
    ``options.form``); returns a new bundle with freshly exported programs, the input is untouched.

    Cases handled (a site needs all of them; one that misses any is skipped, and when none is left
    :func:`requires` gives the reason for every module list it looked at):

    - experts are members ``<site>.<list>.<j>`` of an ``nn.ModuleList`` (found via the nodes'
      ``nn_module_stack``), all reading the same token-major tensor ``x [T,B,I]``, with per-token
      weights ``[T, I, O]`` (``get_attr`` parameters);
    - expert body: an MLP ``act(x@W1 (+b1)) @ W2 (+b2)`` with ``act`` one of GELU (any approximation),
      ReLU, SiLU — RankMixer Sparse-MoE, biases included — or a SwiGLU
      ``(silu(x@Wg) * (x@Wu)) @ Wd`` — TokenMixer-Large sub-experts; all experts of a site alike;
    - each expert output is multiplied by a column slice ``G[..., c:c+1]`` of one gate tensor
      ``G [T,B,R]`` (one column per expert), whatever computes ``G`` (ReLU routing with DTSI, top-k
      softmax + scatter times α, ...), and the products are summed by a chain of adds;
    - an addend of that sum that is the output of another expert-like module of the same site reading
      the same ``x`` (TokenMixer-Large's shared expert) is packed as an always-on expert (gate 1); any
      other addend is kept and added to the packed output.

    Not handled (skipped, with the reason): experts with 2-D (shared-across-token) weights, gates
    read with ``select``/``index`` instead of a column slice, outputs combined by stack + gather.
    """
    segments, report = [], {"form": options.form, "segments": []}
    for seg in bundle.segments:
        gm = seg.program.module()    # a fresh module: rewriting it leaves seg.program untouched
        sites, _ = find_sites(gm)
        if not sites:
            segments.append(seg)
            continue
        entries = [{"site": site.path, "kind": site.experts[0].kind, "experts": len(site.experts),
                    "shared": site.shared, "routing": site.routing, "extra_addends": len(site.extras),
                    "weights": _rewrite(gm, site, options.form, i).shapes()} for i, site in enumerate(sites)]
        gm.graph.eliminate_dead_code()
        for site in sites:                        # drop the per-expert modules nothing reads any more
            for module in [site.members] + [e.root for e in site.experts[:site.shared]]:
                if not any(n.op == "get_attr" and within(str(n.target), module) for n in gm.graph.nodes):
                    gm.delete_submodule(module)
        gm.recompile()
        feeds, dynamic = _example_feeds(seg.inputs)
        program = torch.export.export(gm, (), kwargs=feeds, dynamic_shapes=dynamic, strict=False)
        before, after = _op_counts(seg.program.graph), _op_counts(program.graph)
        report["segments"].append({
            "segment": seg.name, "sites": entries,
            "matmul_before": before.get("matmul.default", 0), "matmul_after": after.get("matmul.default", 0),
            "ops_before": sum(before.values()), "ops_after": sum(after.values())})
        segments.append(dataclasses.replace(seg, program=program))
    report["sites"] = sum(len(s["sites"]) for s in report["segments"])
    report["experts"] = sum(e["experts"] for s in report["segments"] for e in s["sites"])
    report["note"] = ("dense masking: every expert runs and the router's gates weight it; exact for any "
                      "gating, static shapes (no NonZero/Loop/If)")
    return PassResult(bundle.replace(segments=tuple(segments)), report)


def requires(bundle: Bundle) -> None:
    """At least one segment holds a packable MoE site; otherwise say what was looked at."""
    if bundle.stage != "program":
        raise PreconditionError(f"pack-moe-experts works on the torch.export program; the bundle is at "
                                f"the {bundle.stage} stage", "run it before any ONNX-stage pass")
    found, why = 0, []
    for seg in bundle.segments:
        if seg.program is None:
            why.append(f"segment {seg.name!r} has no program")
            continue
        sites, reasons = find_sites(seg.program.module())
        found += len(sites)
        why += [f"{seg.name}: {r}" for r in reasons]
    if not found:
        raise PreconditionError(
            "pack-moe-experts expected a Sparse-MoE: E >= 2 expert MLPs/SwiGLUs in an nn.ModuleList "
            "reading one token tensor, each multiplied by a column of a router gate tensor and summed; "
            "found none" + (f" (module lists checked: {'; '.join(why)})" if why else " (no module lists)"),
            "this pass applies to rankmixer-moe and tokenmixer-large with moe=True; drop it for dense models")


PASS = PassInfo(name="pack-moe-experts", stage="program", run=pack_moe_experts, options=Options,
                requires=requires)

"""RankMixer Sparse-MoE (arXiv 2507.15551 §3.4): RankMixer whose per-token FFN
becomes ``E`` per-token experts with **ReLU routing** and **DTSI** (dense-training, sparse-inference).

Tokenization, token mixing and the post-norm block are RankMixer's (imported from
:mod:`.rankmixer`); only the FFN changes. For token t with mixed input ``s_t``::

    G_t = ReLU(h(s_t))                      [E]   no top-k, no softmax: the active count varies
    v_t = Σ_j G_{t,j} · e_{t,j}(s_t)              e_{t,j}: a full-size per-token FFN [D,kD],[kD,D]

DTSI: two per-token routers ``h_train`` and ``h_infer`` (``[T, D, E]`` each). The training forward
routes with ``h_train`` (dense gates, so every expert gets gradient); the eval forward — the one that
is exported — uses only ``h_infer``, whose ReLU gates are L1-penalised and so mostly exactly zero.

The experts are written the way a researcher writes them: an ``nn.ModuleList`` of expert MLPs
combined in a Python loop with dense gate masking. ``torch.export`` unrolls the loop into ``E``
parallel MatMul chains; the ``pack-moe-experts`` pass (``DEFAULT_PASSES``) turns them into stacked
expert weights run as two batched MatMuls.

Choices where the paper is silent ([inferred]):
- **How h_infer learns.** The paper says both routers are trained, the L1 term applies only to
  h_infer and the training forward uses h_train; it does not say where h_infer's task signal comes
  from (with the L1 term alone its gates collapse to zero). We *distil*: each block also combines
  its (detached) expert outputs with h_infer's gates, ``v_i = Σ_j G^infer_j e_j``, and is penalised
  by the relative squared error to the (detached) h_train output ``v_t = Σ_j G^train_j e_j``:
  ``‖v_i - v_t‖² / ‖v_t‖²`` (relative, because a LayerNorm follows and the scale of ``v_t`` is
  free). The training objective is ``BCE + λ·L1 + distill_weight·Σ_blocks ‖v_i - v_t‖²/‖v_t‖²``;
  experts and h_train learn from the task only, h_infer learns to reproduce the dense routing
  sparsely. The experts run once per step (no second forward pass).
- **L1 normalisation.** ``L1 = mean over rows, tokens, experts and blocks of G^infer`` (the paper's
  ``Σ_t Σ_j G_{t,j}`` divided by ``T·E·L`` so λ does not depend on the sizes).
- **Adaptive λ.** λ starts at ``l1_weight``; after every training step it is multiplied by
  ``l1_adapt`` when the fraction of non-zero h_infer gates is above ``active_budget`` and divided by
  it otherwise (ReMoE-style controller; ``l1_adapt = 1`` keeps λ fixed). λ is trainer state, not a
  weight: it lives on the model object and is not saved in checkpoints.
- experts are full-size FFNs with biases (so parameters grow about E×), routers have biases.

The family in prose, beside the others (math, these choices, the serving structure the passes
rely on): ``docs/models.md``, section ``rankmixer-moe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import rankmixer
from .common import FeatureSchema, PerTokenLinear

FAMILY = "rankmixer-moe"
DEFAULT_PASSES: tuple[str, ...] = ("pack-moe-experts",)


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=FeatureSchema)
    tokens: int = 8              # T (= mixing heads H)
    dim: int = 64                # D, token width; must be divisible by T
    ffn_mult: int = 4            # k: every expert is a full per-token FFN [D, kD], [kD, D]
    layers: int = 2              # L
    experts: int = 4             # E experts per token
    emb_dim: int = 16            # width of each raw feature embedding
    tasks: int = 1
    l1_weight: float = 1e-2      # initial λ of the L1 penalty on h_infer's gates
    active_budget: float = 0.25  # target fraction of non-zero h_infer gates
    l1_adapt: float = 1.05       # per-step multiplicative λ controller (1.0 = fixed λ)
    distill_weight: float = 1.0  # weight of the h_infer ← h_train distillation term

    def __post_init__(self) -> None:
        if min(self.tokens, self.dim, self.ffn_mult, self.layers, self.tasks) < 1:
            raise ValueError("tokens, dim, ffn_mult, layers and tasks must all be >= 1")
        if self.experts < 2:
            raise ValueError(f"experts must be >= 2 for a mixture, found {self.experts}")
        if self.dim % self.tokens:
            raise ValueError(f"dim ({self.dim}) must be divisible by tokens ({self.tokens}): "
                             "token mixing uses H = T heads of width D/T")
        if not 0.0 < self.active_budget <= 1.0 or self.l1_adapt < 1.0 or self.l1_weight < 0:
            raise ValueError("need 0 < active_budget <= 1, l1_adapt >= 1 and l1_weight >= 0")


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config (spec §11.6): T=8, D=64, k=4, L=2, E=4 (~2.1 M block parameters)."""
    return Config(schema=schema or FeatureSchema())


def base(schema: FeatureSchema | None = None) -> Config:
    """CPU benchmark config: T=16, D=64, k=4, L=2, E=8 (~8.5 M block parameters, ~4.3 GFLOP
    for a 256-row batch with every expert computed: 50-100 ms on 2 CPU cores)."""
    return Config(schema=schema or FeatureSchema(), tokens=16, dim=64, experts=8, emb_dim=32)


@dataclass
class RoutingStats:
    """What one MoE layer's training forward leaves for :meth:`Model.training_loss`."""

    l1: torch.Tensor        # mean h_infer gate (scalar)
    distill: torch.Tensor   # relative squared error, h_infer vs h_train combination (scalar)
    active: torch.Tensor    # fraction of non-zero h_infer gates (scalar, no grad)


class SparseMoE(nn.Module):
    """``[T,B,D]`` → ``[T,B,D]``: E per-token experts mixed by ReLU gates; DTSI routers."""

    def __init__(self, tokens: int, dim: int, hidden: int, experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(rankmixer.PerTokenFFN(tokens, dim, hidden) for _ in range(experts))
        self.router_train = PerTokenLinear(tokens, dim, experts)   # h_train [T,D,E]
        self.router_infer = PerTokenLinear(tokens, dim, experts)   # h_infer [T,D,E]
        self.stats: RoutingStats | None = None

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # s [T,B,D]
        if not self.training:
            # sparse inference: only h_infer; zero gates still multiply their expert (dense masking),
            # which keeps the exported graph static (pack-moe-experts then stacks the experts)
            gates = F.relu(self.router_infer(s))                       # [T,B,E]
            out = gates[..., 0:1] * self.experts[0](s)                  # [T,B,D]
            for j in range(1, len(self.experts)):
                out = out + gates[..., j:j + 1] * self.experts[j](s)
            return out
        outs = [expert(s) for expert in self.experts]                   # E × [T,B,D], run once
        g_train = F.relu(self.router_train(s))                          # [T,B,E], dense routing
        g_infer = F.relu(self.router_infer(s))                          # [T,B,E], L1-sparse
        v_train = sum((g_train[..., j:j + 1] * o for j, o in enumerate(outs)), torch.zeros_like(s))
        # h_infer sees detached experts and a detached target: it learns routing, not the experts
        v_infer = sum((g_infer[..., j:j + 1] * o.detach() for j, o in enumerate(outs)), torch.zeros_like(s))
        target = v_train.detach()
        # relative squared error: the scale of the expert outputs is free (a LayerNorm follows)
        distill = (v_infer - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
        self.stats = RoutingStats(l1=g_infer.mean(), distill=distill, active=(g_infer > 0).float().mean().detach())
        return v_train


class MoEBlock(rankmixer.Block):
    """RankMixer's post-norm block (its forward is reused as is) with the FFN replaced by the MoE:
    ``S = LN(TokenMix(X) + X)``, ``X' = LN(MoE(S) + S)``."""

    def __init__(self, c: Config) -> None:
        super().__init__(c.tokens, c.dim, 1)   # k=1: the dense FFN it builds is replaced below
        self.ffn = SparseMoE(c.tokens, c.dim, c.ffn_mult * c.dim, c.experts)


class Model(rankmixer.Model):
    """rankmixer.Model (tokenizer, forward, head) with MoE blocks: logits ``[B, tasks]``."""

    family = FAMILY

    def __init__(self, config: Config) -> None:
        # The parent builds dense blocks from the shared fields (tokens, dim, ffn_mult, layers...);
        # they are replaced by MoE blocks so the tokenizer, forward and head stay RankMixer's own.
        super().__init__(config)  # type: ignore[arg-type]
        self.blocks = nn.ModuleList(MoEBlock(config) for _ in range(config.layers))
        self.l1_lambda = config.l1_weight   # adaptive λ (trainer state, see module docstring)

    def moe_layers(self) -> list[SparseMoE]:
        return [block.ffn for block in self.blocks]

    def training_loss(self, feeds: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """BCE + λ·L1(h_infer gates) + distill_weight·Σ_blocks distill; then adapts λ."""
        for moe in self.moe_layers():
            moe.stats = None
        if not self.training:
            raise RuntimeError("training_loss needs train mode (model.train()): the DTSI terms come "
                               "from the training forward")
        loss = super().training_loss(feeds, label)
        stats = [moe.stats for moe in self.moe_layers()]
        if any(s is None for s in stats):
            raise RuntimeError("an MoE layer did not run its training forward")
        l1 = torch.stack([s.l1 for s in stats]).mean()                 # type: ignore[union-attr]
        distill = torch.stack([s.distill for s in stats]).sum()        # type: ignore[union-attr]
        active = float(torch.stack([s.active for s in stats]).mean())  # type: ignore[union-attr]
        total = loss + self.l1_lambda * l1 + self.config.distill_weight * distill
        c = self.config
        self.l1_lambda *= c.l1_adapt if active > c.active_budget else 1.0 / c.l1_adapt
        return total

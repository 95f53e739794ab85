"""TokenMixer-Large (arXiv 2602.06563): group tokens plus a global token,
mixing with free H and reverting, pre-RMSNorm, per-token SwiGLU in the mixed and the original token
space, inter-layer residuals, training-only auxiliary heads, and the Sparse-Pertoken MoE.

Block (spec §2.2, eq. 12/16; W = T·D/H, no linear biases anywhere in the backbone)::

    Hm = Mix_H(X)                            [H,B,W]
    Hn = Hm + F1(RMSNorm_W(Hm))              F1: per-token SwiGLU over the H mixed tokens, [H,W,nW]
    Xr = Revert(Hn)                          [T,B,D]
    X' = X + F2(RMSNorm_D(Xr))               F2: per-token SwiGLU over the T tokens, [T,D,nD]

Inter-layer residual: block i (0-based) with ``i >= gap``, ``i % gap == 0`` and ``i`` not the last
block adds the output of block ``i - gap``; each such block also feeds a shared auxiliary tower
(mean-pooled tokens → logits) that only :meth:`Model.training_loss` uses. The eval forward — what is
exported — returns the main logits only, so the auxiliary head never reaches the graph.

Sparse-Pertoken MoE (``moe=True``, spec §2.4), used for both F1 and F2: the dense SwiGLU hidden
width ``n·width`` is split into ``E`` sub-experts of ``n·width/E`` ("first enlarge, then sparse"):
one always-on shared expert plus ``E-1`` routed ones, ``y = α·Σ_{i∈top(k-1)} softmax_i·Expert_i(x)
+ Shared(x)``, with a per-token router ``[tokens, width, E-1]``. The experts are a Python list
combined in a loop with dense gate masking (every expert runs; non-selected gates are 0), which is
what ``torch.export`` sees; ``pack-moe-experts`` rewrites it.

Choices where the paper is silent ([inferred]):
- tokenization: the concatenated user and item embeddings are cut into ``T-1`` equal groups (the
  group MLPs are per-token linears ``[T-1, chunk, D]`` → ReLU → ``[T-1, D, D]``); the global token
  is an MLP over the raw concatenation (as ``fay85/tokenmixerlarge``), placed first;
- the equation form of the block (not the Figure 1 form); inter-residual gap 2 (``fay85``);
- readout: mean over tokens → per-task towers; the auxiliary tower is one shared :class:`Towers`;
  training loss ``BCE(main) + aux_weight · mean_i BCE(aux_i)``;
- init: up/gate uniform ±1/√fan_in, down the same times ``down_init`` (0.01, the paper's best
  scale); routers uniform ±1/√fan_in.

The family in prose, beside the others (math, these choices, the serving structure the passes
rely on): ``docs/models.md``, section ``tokenmixer-large``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .common import (FeatureSchema, PerTokenLinear, RankingModel, Towers, chunk_tokens,
                     token_mix, token_revert)

FAMILY = "tokenmixer-large"
DEFAULT_PASSES: tuple[str, ...] = ("pack-moe-experts",)   # refused (precondition) when moe=False


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=FeatureSchema)
    tokens: int = 8            # T: T-1 group tokens + 1 global token
    dim: int = 64              # D
    heads: int = 4             # H, mixing heads (need not equal T); must divide D
    ffn_mult: int = 2          # n: SwiGLU hidden = n·width
    layers: int = 4            # L
    moe: bool = True           # Sparse-Pertoken MoE in F1 and F2 (False: dense per-token SwiGLU)
    experts: int = 4           # E sub-experts per token, the shared one included
    top_k: int = 2             # k active experts per token, the shared one included (k-1 routed)
    alpha: float = 2.0         # gate value scaling, ≈ 1/sparsity (2 at 1:2)
    residual_every: int = 2    # inter-layer residual gap
    aux_weight: float = 0.1    # weight of the auxiliary-head BCE in the training loss
    down_init: float = 0.01    # scale of the down-projection init relative to up/gate
    emb_dim: int = 16
    tasks: int = 1

    def __post_init__(self) -> None:
        if min(self.tokens - 1, self.dim, self.heads, self.ffn_mult, self.layers, self.tasks,
               self.residual_every) < 1:
            raise ValueError("need tokens >= 2 and dim, heads, ffn_mult, layers, tasks, residual_every >= 1")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.moe:
            if self.experts < 2 or not 2 <= self.top_k <= self.experts:
                raise ValueError(f"MoE needs experts >= 2 and 2 <= top_k <= experts (one shared + at "
                                 f"least one routed), found experts={self.experts}, top_k={self.top_k}")
            width = self.tokens * self.dim // self.heads
            if (self.ffn_mult * self.dim) % self.experts or (self.ffn_mult * width) % self.experts:
                raise ValueError(f"the SwiGLU hidden widths n·D={self.ffn_mult * self.dim} and "
                                 f"n·T·D/H={self.ffn_mult * width} must be divisible by experts={self.experts}")


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config (spec §11.6): T=8 (7 groups + global), D=64, H=4, n=2, L=4, SP-MoE E=4, k=2 (1:2)."""
    return Config(schema=schema or FeatureSchema())


def tiny_dense(schema: FeatureSchema | None = None) -> Config:
    """The tiny config with dense per-token SwiGLU (same parameter count as the MoE one)."""
    return Config(schema=schema or FeatureSchema(), moe=False)


def base(schema: FeatureSchema | None = None) -> Config:
    """CPU benchmark config: T=16, D=64, H=8, n=2, L=4, SP-MoE E=4, k=2 (~4.7 M block parameters,
    ~2.4 GFLOP for a 256-row batch with every expert computed)."""
    return Config(schema=schema or FeatureSchema(), tokens=16, heads=8, emb_dim=32)


class SwiGLU(nn.Module):
    """Per-token SwiGLU, no biases: ``[T,B,I]`` → ``down(silu(gate(x)) · up(x))`` ``[T,B,I]``."""

    def __init__(self, tokens: int, width: int, hidden: int, down_init: float) -> None:
        super().__init__()
        self.gate = PerTokenLinear(tokens, width, hidden, bias=False)   # [T,I,h]
        self.up = PerTokenLinear(tokens, width, hidden, bias=False)     # [T,I,h]
        self.down = PerTokenLinear(tokens, hidden, width, bias=False)   # [T,h,I]
        with torch.no_grad():
            self.down.weight.mul_(down_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class SparsePertokenMoE(nn.Module):
    """``[T,B,I]`` → ``[T,B,I]``: shared sub-expert + α·(softmax over the top-(k-1) routed ones)."""

    def __init__(self, tokens: int, width: int, hidden: int, c: Config) -> None:
        super().__init__()
        sub = hidden // c.experts                                       # "first enlarge, then sparse"
        self.shared = SwiGLU(tokens, width, sub, c.down_init)
        self.experts = nn.ModuleList(SwiGLU(tokens, width, sub, c.down_init) for _ in range(c.experts - 1))
        self.router = PerTokenLinear(tokens, width, c.experts - 1, bias=False)   # [T,I,E-1]
        self.routed_k = c.top_k - 1
        self.alpha = c.alpha

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """α·softmax over the top-(k-1) router logits, 0 elsewhere: ``[T,B,E-1]``."""
        logits = self.router(x)                                         # [T,B,E-1]
        top, idx = logits.topk(self.routed_k, dim=-1)                   # [T,B,k-1]
        return self.alpha * torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gates(x)                                           # [T,B,E-1]
        out = self.shared(x)                                            # [T,B,I]
        for j, expert in enumerate(self.experts):                       # dense masking: all run
            out = out + gates[..., j:j + 1] * expert(x)
        return out


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.tokens, self.heads = c.tokens, c.heads
        width = c.tokens * c.dim // c.heads                             # W, mixed-token width

        def ffn(tokens: int, w: int) -> nn.Module:
            if c.moe:
                return SparsePertokenMoE(tokens, w, c.ffn_mult * w, c)
            return SwiGLU(tokens, w, c.ffn_mult * w, c.down_init)

        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.f1 = ffn(c.heads, width)                                   # mixed space, [H,W,nW]
        self.norm2 = nn.RMSNorm(c.dim, eps=1e-6)
        self.f2 = ffn(c.tokens, c.dim)                                  # token space, [T,D,nD]

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # x [T,B,D]
        hm = token_mix(x, self.heads)                                   # [H,B,W]
        hn = hm + self.f1(self.norm1(hm))                               # [H,B,W]
        xr = token_revert(hn, self.tokens)                              # [T,B,D]
        return x + self.f2(self.norm2(xr))                              # [T,B,D]


class Model(RankingModel):
    family = FAMILY

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        width = self.embed.user_width + self.embed.item_width
        self.groups = c.tokens - 1
        self.chunk = math.ceil(width / self.groups)
        # one MLP per group (per-token linears) and one MLP over all groups for the global token
        self.group_in = PerTokenLinear(self.groups, self.chunk, c.dim, bias=False)
        self.group_out = PerTokenLinear(self.groups, c.dim, c.dim, bias=False)
        self.global_mlp = nn.Sequential(nn.Linear(width, c.dim, bias=False), nn.ReLU(),
                                        nn.Linear(c.dim, c.dim, bias=False))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.head = Towers(c.dim, c.tasks)
        self.aux_head = Towers(c.dim, c.tasks)                          # training only

    def residual_sources(self) -> dict[int, int]:
        """Inter-layer residuals: {block index: index of the earlier block whose output it adds}."""
        gap, last = self.config.residual_every, self.config.layers - 1
        return {i: i - gap for i in range(gap, last, gap)}

    def tokenize(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                 seq_items: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.embed.user(user_cat, seq_items),            # [B, Eu]
                       self.embed.item(item_cat, item_dense)], 1)       # [B, Eu+Ei]
        groups = chunk_tokens(e, self.groups, self.chunk)               # [T-1,B,chunk]
        tokens = self.group_out(F.relu(self.group_in(groups)))          # [T-1,B,D]
        return torch.cat([self.global_mlp(e).unsqueeze(0), tokens], 0)  # [T,B,D], global first

    def backbone(self, x: torch.Tensor, aux: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Blocks with inter-layer residuals; appends the pooled aux-layer states to ``aux``."""
        sources = self.residual_sources()
        outputs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x)                                                # [T,B,D]
            if i in sources:
                x = x + outputs[sources[i]]
                if aux is not None:
                    aux.append(x.mean(0))                               # [B,D]
            outputs.append(x)
        return x

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                seq_items: torch.Tensor) -> torch.Tensor:
        x = self.backbone(self.tokenize(user_cat, item_cat, item_dense, seq_items))
        return self.head(x.mean(0))                                     # [B, tasks]

    def training_loss(self, feeds: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """BCE of task 0 plus ``aux_weight`` times the mean BCE of the auxiliary heads."""
        pooled: list[torch.Tensor] = []
        x = self.backbone(self.tokenize(**feeds), pooled)
        loss = F.binary_cross_entropy_with_logits(self.head(x.mean(0))[:, 0], label)
        if pooled and self.config.aux_weight > 0:
            aux = torch.stack([F.binary_cross_entropy_with_logits(self.aux_head(p)[:, 0], label)
                               for p in pooled]).mean()
            loss = loss + self.config.aux_weight * aux
        return loss

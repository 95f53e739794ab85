"""UG-Sep, "Compute Only Once" (arXiv 2602.10455): a RankMixer backbone whose Tu user tokens only
ever receive information from user tokens, so they form a closed sub-network that serving computes
once per request and reuses for all N candidates.

Tokens are ``X = [U ; G]`` with ``U [Tu,B,D]`` (user features + pooled behaviour sequence) and
``G [Tg,B,D]`` (item features), **kept in separate tensors** so that a generic graph pass sees the
user/item boundary. Mixing uses H = T = Tu + Tg heads of width D/T; mixed token h is the
concatenation over all tokens of their h-th slice, and for user positions (h < Tu) the slices that
came from G tokens are zeroed (the UG mask)::

    mixU[h] = concat(U[0..Tu)[h], 0 ... 0)          h < Tu    (user positions: user slices only)
    mixG[h] = concat(U[0..Tu)[h], G[0..Tg)[h])      h >= Tu   (item positions: everything)
    U' = LN(PFFN_U(S_U) + S_U),  S_U = LN(mixU + U)           per-token FFN/LN: U stays user-only
    G' = LN(PFFN_G(S_G) + S_G) + Wc·mean_t(U'),  S_G = LN(mixG + G)

Choices where the paper is silent ([inferred]): the exact mask indexing above;
**information compensation** ``G_j += mean_t(U')·Wc[j]`` after every block with a zero-initialised
``Wc [Tg,D,D]`` (one-way U→G), so training starts from plain UG-Sep; the separated residual of
pyramid variants is omitted (T is constant); head = mean over all T tokens → per-task towers.
The G side reads the user states of **every** layer, so the user/item cut is per layer.

The family in prose, beside the others (math, these choices, the serving structure the passes
rely on): ``docs/models.md``, section ``ugsep``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .common import FeatureSchema, PerTokenLinear, RankingModel, Towers, chunk_tokens
from .rankmixer import PerTokenFFN

FAMILY = "ugsep"
DEFAULT_PASSES: tuple[str, ...] = ("split-user-item",)


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=FeatureSchema)
    user_tokens: int = 4     # Tu
    item_tokens: int = 4     # Tg
    dim: int = 64            # D; divisible by T = Tu + Tg
    ffn_mult: int = 4        # k
    layers: int = 2          # L
    emb_dim: int = 16
    tasks: int = 1

    def __post_init__(self) -> None:
        if min(self.user_tokens, self.item_tokens, self.dim, self.ffn_mult, self.layers, self.tasks) < 1:
            raise ValueError("user_tokens, item_tokens, dim, ffn_mult, layers and tasks must all be >= 1")
        if self.dim % (self.user_tokens + self.item_tokens):
            raise ValueError(f"dim ({self.dim}) must be divisible by user_tokens + item_tokens "
                             f"({self.user_tokens + self.item_tokens}): mixing uses H = T heads")


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config: Tu = Tg = 4, D = 64, k = 4, L = 2 (~0.56 M block parameters)."""
    return Config(schema=schema or FeatureSchema())


def base(schema: FeatureSchema | None = None) -> Config:
    """Benchmark config: Tu = Tg = 8, D = 320, k = 4, L = 2 (~29 M block parameters)."""
    return Config(schema=schema or FeatureSchema(), user_tokens=8, item_tokens=8, dim=320, emb_dim=32)


class UGBlock(nn.Module):
    """One masked mixing block; U ``[Tu,B,D]`` and G ``[Tg,B,D]`` in, the same out."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.tu, self.tg = c.user_tokens, c.item_tokens
        self.norm1 = nn.LayerNorm(c.dim)
        self.norm2 = nn.LayerNorm(c.dim)
        self.ffn_user = PerTokenFFN(self.tu, c.dim, c.ffn_mult * c.dim)
        self.ffn_item = PerTokenFFN(self.tg, c.dim, c.ffn_mult * c.dim)
        self.compensation = PerTokenLinear(self.tg, c.dim, c.dim, bias=False)
        nn.init.zeros_(self.compensation.weight)  # starts as plain UG-Sep

    def forward(self, u: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tu, tg = self.tu, self.tg
        b, d = u.shape[1], u.shape[2]
        dh = d // (tu + tg)
        uh = u.reshape(tu, b, tu + tg, dh)                          # [Tu,B,H,dh]
        gh = g.reshape(tg, b, tu + tg, dh)                          # [Tg,B,H,dh]
        # user positions h < Tu: user slices, item slices masked to zero
        mix_u = F.pad(uh[:, :, :tu].permute(2, 1, 0, 3).reshape(tu, b, tu * dh), (0, tg * dh))  # [Tu,B,D]
        # item positions h >= Tu: slices of every token, users first
        mix_g = torch.cat([uh[:, :, tu:].permute(2, 1, 0, 3).reshape(tg, b, tu * dh),
                           gh[:, :, tu:].permute(2, 1, 0, 3).reshape(tg, b, tg * dh)], dim=-1)  # [Tg,B,D]
        su = self.norm1(mix_u + u)
        sg = self.norm1(mix_g + g)
        u_out = self.norm2(self.ffn_user(su) + su)                  # [Tu,B,D]
        g_out = self.norm2(self.ffn_item(sg) + sg)                  # [Tg,B,D]
        u_mean = u_out.mean(0, keepdim=True).expand(tg, b, d)       # [Tg,B,D] one-way U→G
        return u_out, g_out + self.compensation(u_mean)


class Model(RankingModel):
    family = FAMILY

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.user_chunk = math.ceil(self.embed.user_width / c.user_tokens)
        self.item_chunk = math.ceil(self.embed.item_width / c.item_tokens)
        self.user_tokenizer = PerTokenLinear(c.user_tokens, self.user_chunk, c.dim)
        self.item_tokenizer = PerTokenLinear(c.item_tokens, self.item_chunk, c.dim)
        self.blocks = nn.ModuleList(UGBlock(c) for _ in range(c.layers))
        self.head = Towers(c.dim, c.tasks)

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                seq_items: torch.Tensor) -> torch.Tensor:
        c = self.config
        u = self.user_tokenizer(chunk_tokens(self.embed.user(user_cat, seq_items), c.user_tokens,
                                             self.user_chunk))                      # [Tu,B,D]
        g = self.item_tokenizer(chunk_tokens(self.embed.item(item_cat, item_dense), c.item_tokens,
                                             self.item_chunk))                      # [Tg,B,D]
        for block in self.blocks:
            u, g = block(u, g)
        pooled = (u.sum(0) + g.sum(0)) / (c.user_tokens + c.item_tokens)            # [B,D]
        return self.head(pooled)                                                     # [B,tasks]

"""RankMixer (arXiv 2507.15551): semantic tokenization, parameter-free multi-head token mixing,
per-token FFN, post-norm residual blocks, mean pooling and per-task towers.

Block n (post-norm, H = T heads so the mixed tensor has the input's shape)::

    S = LN(TokenMix(X) + X)
    X' = LN(PFFN(S) + S)          PFFN: token t has its own W1[t] [D,kD], W2[t] [kD,D], GELU

Choices where the paper is silent ([inferred]):
- tokenization: the user group (user columns + pooled behaviour sequence) and the item group
  (item columns + dense projection) are concatenated in that order, padded and cut into T chunks,
  each projected by its own weight ``[T, d, D]`` (the per-token-linear pattern of the FFN);
- the FFN multiplier k defaults to 4; towers are Linear(D, D/2) → ReLU → Linear(D/2, 1) per task.

The family in prose, beside the others (math, these choices, the serving structure the passes
rely on): ``docs/models.md``, section ``rankmixer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .common import FeatureSchema, PerTokenLinear, RankingModel, Towers, chunk_tokens, token_mix

FAMILY = "rankmixer"
DEFAULT_PASSES: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=FeatureSchema)
    tokens: int = 8        # T (= mixing heads H)
    dim: int = 64          # D, token width; must be divisible by T
    ffn_mult: int = 4      # k
    layers: int = 2        # L
    emb_dim: int = 16      # width of each raw feature embedding
    tasks: int = 1

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.dim < 1 or self.ffn_mult < 1 or self.layers < 1 or self.tasks < 1:
            raise ValueError("tokens, dim, ffn_mult, layers and tasks must all be >= 1")
        if self.dim % self.tokens:
            raise ValueError(f"dim ({self.dim}) must be divisible by tokens ({self.tokens}): "
                             "token mixing uses H = T heads of width D/T")


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config: T=8, D=64, k=4, L=2 (~0.53 M block parameters)."""
    return Config(schema=schema or FeatureSchema())


def base(schema: FeatureSchema | None = None) -> Config:
    """Benchmark config: T=16, D=320, k=4, L=2 (~26 M block parameters)."""
    return Config(schema=schema or FeatureSchema(), tokens=16, dim=320, layers=2, emb_dim=32)


class PerTokenFFN(nn.Module):
    """``[T,B,D]`` → ``[T,B,D]``: GELU(x W1[t] + b1[t]) W2[t] + b2[t], one weight pair per token."""

    def __init__(self, tokens: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = PerTokenLinear(tokens, dim, hidden)
        self.fc2 = PerTokenLinear(tokens, hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, tokens: int, dim: int, ffn_mult: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = PerTokenFFN(tokens, dim, ffn_mult * dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T,B,D]
        s = self.norm1(token_mix(x, self.tokens) + x)      # [T,B,D]
        return self.norm2(self.ffn(s) + s)                 # [T,B,D]


class Model(RankingModel):
    family = FAMILY

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        width = self.embed.user_width + self.embed.item_width
        self.chunk = math.ceil(width / c.tokens)
        self.tokenizer = PerTokenLinear(c.tokens, self.chunk, c.dim)
        self.blocks = nn.ModuleList(Block(c.tokens, c.dim, c.ffn_mult) for _ in range(c.layers))
        self.head = Towers(c.dim, c.tasks)

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                seq_items: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.embed.user(user_cat, seq_items),      # [B, Eu]
                       self.embed.item(item_cat, item_dense)], 1)   # [B, Eu+Ei]
        x = self.tokenizer(chunk_tokens(e, self.config.tokens, self.chunk))  # [T,B,D]
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(0))                                 # [B, tasks]

"""Pyramid Mixer (arXiv 2506.16942): MLP-Mixer layers over multi-behaviour user sequences, mixing
across behaviour types and feature attributes, stacked as a pyramid from short to long periods; the
resulting interest tokens join the user and item tokens in a RankMixer backbone.

Shapes (``Nb`` behaviour types, ``P`` positions per type, ``F`` feature attributes, ``e`` their
embedding width ``behaviour_dim``)::

    seq_behaviours [B,Nb,P,F] → one embedding per attribute → X0 [B,Nb,P,F,e], valid m0 [B,Nb,P]
    level l (l = 1..levels), on X [B,Nb,P_l,F,e]:
        X += MLP_behaviour(LN(X))  along Nb     (cross-behaviour mixing)
        X += MLP_feature(LN(X))    along F      (cross-feature mixing)
        X += MLP_channel(LN(X))    along e
        X ← masked mean of each ``pool`` adjacent periods: P_{l+1} = P_l / pool   (cross-period)
    interest tokens: the last level's Nb·P_L periods, each F·e → D by its own weight  [Ti,B,D]
    user tokens  [Tu,B,D]  (user columns + pooled seq_items, RankMixer tokenization)
    item tokens  [Tg,B,D]  (item columns + dense projection)
    backbone: RankMixer blocks over T = Ti + Tu + Tg tokens (H = T) → mean → towers → logit

Choices where the paper is silent (only its abstract was found; [inferred]):
- **Behaviour types** come from the rating (disliked 1-2, neutral 3, liked 4-5); **feature
  attributes** are item id, release-year bucket, primary genre and elapsed-time bucket (see
  ``mixexport/data.py``); each attribute has its own embedding table (one Gather per attribute).
- **Periods are windows of consecutive behaviours**, not calendar windows: MovieLens users rate in
  bursts (hundreds of ratings in one day), so fixed calendar windows would be mostly empty; the
  elapsed time since each behaviour is an attribute instead, so a level still knows how old its
  window is. Level 1 sees single behaviours, each pooling merges ``pool`` adjacent windows, so
  level l sees windows of ``pool^(l-1)`` behaviours.
- Pre-LayerNorm residual MLP-Mixer sub-layers with GELU and hidden width ``mix_mult`` × the mixed
  axis; padding (item id 0) is excluded from every pooling (an empty window pools to zero).
- The **whole pyramid reads only user-side inputs** and its interest tokens are separate tensors
  until they meet the item tokens in the first backbone block, so ``split-user-item`` moves the
  whole pyramid (and the user tokenizer) into the user segment.
- Tokens are mixed RankMixer-style (parameter-free, H = T) after the three token groups are
  concatenated; D must be divisible by T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .common import FeatureSchema, PerTokenLinear, RankingModel, Towers, chunk_tokens
from .rankmixer import Block

FAMILY = "pyramid-mixer"
DEFAULT_PASSES: tuple[str, ...] = ("split-user-item",)
MOVIELENS_SEQ_LEN = 32
MOVIELENS_BEHAVIOUR_LEN = 16


def _schema() -> FeatureSchema:
    return FeatureSchema(behaviour_len=MOVIELENS_BEHAVIOUR_LEN)


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=_schema)
    levels: int = 3          # pyramid levels; behaviour_len must be divisible by pool^levels
    pool: int = 2            # adjacent windows merged after each level
    mix_mult: int = 2        # hidden width of the mixing MLPs, × the mixed axis
    user_tokens: int = 1     # Tu
    item_tokens: int = 1     # Tg
    dim: int = 64            # D; divisible by T = Nb·P_L + Tu + Tg
    ffn_mult: int = 4
    layers: int = 2          # RankMixer backbone blocks
    emb_dim: int = 16        # width of each user/item feature embedding
    behaviour_dim: int = 16  # e: width of each behaviour attribute embedding inside the pyramid
    tasks: int = 1

    def __post_init__(self) -> None:
        if min(self.levels, self.pool, self.mix_mult, self.user_tokens, self.item_tokens, self.dim,
               self.ffn_mult, self.layers, self.emb_dim, self.behaviour_dim, self.tasks) < 1:
            raise ValueError("levels, pool, mix_mult, user_tokens, item_tokens, dim, ffn_mult, layers, "
                             "emb_dim, behaviour_dim and tasks must all be >= 1")
        s = self.schema
        if s.behaviour_len < 1:
            raise ValueError("pyramid-mixer reads seq_behaviours: the schema needs behaviour_len >= 1")
        if s.behaviour_len % self.pool ** self.levels:
            raise ValueError(f"behaviour_len ({s.behaviour_len}) must be divisible by pool^levels "
                             f"({self.pool}^{self.levels})")
        if self.dim % self.tokens:
            raise ValueError(f"dim ({self.dim}) must be divisible by the token count T = behaviour_types · "
                             f"periods + user_tokens + item_tokens ({self.tokens}): mixing uses H = T heads")

    @property
    def periods(self) -> int:
        """Windows per behaviour type after the last level."""
        return self.schema.behaviour_len // self.pool ** self.levels

    @property
    def interest_tokens(self) -> int:
        return self.schema.behaviour_types * self.periods

    @property
    def tokens(self) -> int:
        return self.interest_tokens + self.user_tokens + self.item_tokens


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config: 3 types × 16 behaviours × 4 attributes of width 16, 3 levels (16 → 2 windows),
    T = 6 + 1 + 1, D = 64, L = 2."""
    return Config(schema=schema or _schema())


def base(schema: FeatureSchema | None = None) -> Config:
    """Benchmark config: 3 types × 64 behaviours, 4 levels (64 → 4 windows), T = 12 + 2 + 2, D = 256,
    e = 16, L = 2."""
    schema = schema or FeatureSchema(behaviour_len=64, seq_vocab=5000,
                                     behaviour_vocab=(5000, 17, 20, 11))
    return Config(schema=schema, levels=4, user_tokens=2, item_tokens=2, dim=256, emb_dim=32, behaviour_dim=16)


class AxisMLP(nn.Module):
    """Pre-LN residual MLP along one axis of ``[B,Nb,P,F,e]`` (LayerNorm always over ``e``)."""

    def __init__(self, emb_dim: int, size: int, hidden: int, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.norm = nn.LayerNorm(emb_dim)
        self.fc1 = nn.Linear(size, hidden)
        self.fc2 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).movedim(self.axis, -1)
        return x + self.fc2(F.gelu(self.fc1(h))).movedim(-1, self.axis)


class Level(nn.Module):
    """Cross-behaviour, cross-feature and channel mixing, then pooling of adjacent windows."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        nb, nf, e, k = c.schema.behaviour_types, len(c.schema.behaviour_vocab), c.behaviour_dim, c.mix_mult
        self.pool = c.pool
        self.behaviour = AxisMLP(e, nb, k * nb, axis=1)
        self.feature = AxisMLP(e, nf, k * nf, axis=3)
        self.channel = AxisMLP(e, e, k * e, axis=4)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B,Nb,P,F,e]``, valid ``[B,Nb,P]`` → ``[B,Nb,P/pool,F,e]``, ``[B,Nb,P/pool]``."""
        x = self.channel(self.feature(self.behaviour(x)))
        b, nb, p, nf, e = x.shape
        w = valid.reshape(b, nb, p // self.pool, self.pool)                      # [B,Nb,P',pool]
        x = x.reshape(b, nb, p // self.pool, self.pool, nf, e)
        count = w.sum(-1)                                                         # [B,Nb,P']
        pooled = (x * w[..., None, None]).sum(3) / count.clamp(min=1.0)[..., None, None]
        return pooled, (count > 0).to(x.dtype)


class Pyramid(nn.Module):
    """``seq_behaviours [B,Nb,P,F]`` → interest tokens ``[Nb·P_L, B, F·e]`` (zero where a window is empty)."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        vocab = c.schema.behaviour_vocab
        self.tables = nn.ModuleList(nn.Embedding(v, c.behaviour_dim) for v in vocab)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.05)
        self.levels = nn.ModuleList(Level(c) for _ in range(c.levels))

    def forward(self, behaviours: torch.Tensor) -> torch.Tensor:
        x = torch.stack([t(behaviours[..., j]) for j, t in enumerate(self.tables)], dim=3)  # [B,Nb,P,F,e]
        valid = (behaviours[..., 0] > 0).to(x.dtype)                              # [B,Nb,P]
        for level in self.levels:
            x, valid = level(x, valid)
        x = x * valid[..., None, None]                                            # empty windows → 0
        b, nb, p, nf, e = x.shape
        return x.reshape(b, nb * p, nf * e).transpose(0, 1)                       # [Nb·P_L, B, F·e]


class Model(RankingModel):
    family = FAMILY

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.pyramid = Pyramid(c)
        self.interest_proj = PerTokenLinear(c.interest_tokens, len(c.schema.behaviour_vocab) * c.behaviour_dim, c.dim)
        self.user_chunk = math.ceil(self.embed.user_width / c.user_tokens)
        self.item_chunk = math.ceil(self.embed.item_width / c.item_tokens)
        self.user_tokenizer = PerTokenLinear(c.user_tokens, self.user_chunk, c.dim)
        self.item_tokenizer = PerTokenLinear(c.item_tokens, self.item_chunk, c.dim)
        self.blocks = nn.ModuleList(Block(c.tokens, c.dim, c.ffn_mult) for _ in range(c.layers))
        self.head = Towers(c.dim, c.tasks)

    def user_side(self, user_cat: torch.Tensor, seq_items: torch.Tensor,
                  seq_behaviours: torch.Tensor) -> torch.Tensor:
        """Interest tokens then user tokens, ``[Ti+Tu, B, D]``: everything that reads only user inputs."""
        c = self.config
        interest = self.interest_proj(self.pyramid(seq_behaviours))                      # [Ti,B,D]
        user = self.user_tokenizer(chunk_tokens(self.embed.user(user_cat, seq_items), c.user_tokens,
                                                self.user_chunk))                          # [Tu,B,D]
        return torch.cat([interest, user], dim=0)

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                seq_items: torch.Tensor, seq_behaviours: torch.Tensor) -> torch.Tensor:
        c = self.config
        item = self.item_tokenizer(chunk_tokens(self.embed.item(item_cat, item_dense), c.item_tokens,
                                                self.item_chunk))                          # [Tg,B,D]
        x = torch.cat([self.user_side(user_cat, seq_items, seq_behaviours), item], dim=0)  # [T,B,D]
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(0))                                                       # [B,tasks]

"""HyFormer (arXiv 2601.12681): one backbone for the long-sequence model and the feature-interaction
mixer. Non-sequential (NS) tokens and global query tokens; per layer, every behaviour sequence is
encoded and projected to its own ``K_l, V_l``, each sequence's queries read it by cross attention,
and the queries and NS tokens are then mixed together RankMixer-style. Math and serving notes:
docs/models.md, section HyFormer.

Shapes (mixer tokens token-major ``[T, B, D]``; sequences batch-major ``[B, S_j, D]``)::

    NS tokens   F = [user chunks (Mu) ; item chunks (Mi)]      chunk + per-token projection  [M,B,D]
    sequences   seq_1 = the whole history (S, dynamic)          seq_2 = its R most recent items
                H_0^j = Linear(e → D)(item embedding)  (+ a learnable position over R for seq_2)
    queries     GlobalInfo = [F_1..F_M, MeanPool(H_0^1), MeanPool(H_0^2)]            [B, M·D+2D]
                Q = [FFN_1(GlobalInfo) .. FFN_N(GlobalInfo)], ``queries`` per sequence  [N,B,D]
    layer l     H_l^j = Enc_l^j(H_{l-1}^j)                     per sequence, user side only
                K_l^j, V_l^j = H_l^j W_K, H_l^j W_V            [B,h,S_j,dh]  the per-user cache
                Q̂^j = Q^j + CrossAttn(LN(Q^j), K_l^j, V_l^j)   the sequence never sees the queries
                X = [Q̂^1 ; Q̂^2 ; F]  → RankMixer block (mix with H = T, per-token FFN, post-LN)
                Q, F ← X
    out = Towers(mean over the T tokens)

The sequence encoder (``encoder``) is one of:

- ``"swiglu"``: position-wise, the paper's "decoder-style" ``SwiGLU_l``: ``H + SwiGLU(LN(H))`` on
  every position alone. The K/V of a position depend only on that behaviour, so a cached history
  can be extended by appending new behaviours (``extract-kv-cache`` measures this and declares the
  cache appendable);
- ``"attention"``: a pre-LN Transformer encoder layer (bidirectional self-attention over the
  sequence's valid positions, then a SwiGLU FFN). Every position's K/V depend on the whole history,
  so an append recomputes it (the pass declares the cache not appendable).

Choices where the paper is silent ([inferred]):
- Two sequences from one ``seq_items`` input (MovieLens has one history): the long history and its
  ``recent`` most recent items, each with its own input projection, encoders, K/V projections,
  cross attentions and ``queries`` query tokens. Only the short one has a position embedding (a
  fixed window); the long one has none, which keeps its per-position K/V independent of the
  position (a learned absolute position would make an append shift every cached position).
- ``H_l`` builds on ``H_{l-1}`` (the sequence representation evolves with depth, as in the
  reimplementation we read) and the pooled sequences in GlobalInfo are taken from ``H_0``.
- Query decoding adds a residual around a pre-LN cross attention; query boosting is a full
  RankMixer block (post-LN, GELU per-token FFN) updating the queries and the NS tokens. Queries are
  generated once, each layer reuses the previous layer's boosted queries.
- Tokenization: the user columns and the item columns (+ dense projection) are chunked and
  projected separately (RankMixer's per-token projection), so the user NS tokens stay user-side.
- Left padding (id 0) is masked as keys and in the pooling; a sequence with no valid item gives a
  uniform attention row over padding (finite masks, fp16-safe).
- Output head: the mean of the top layer's T tokens, then one tower per task.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixexport.specs import TensorSpec

from .common import FeatureSchema, PerTokenLinear, RankingModel, Towers, chunk_tokens, random_feeds, token_mix

FAMILY = "hyformer"
DEFAULT_PASSES: tuple[str, ...] = ("extract-kv-cache",)
MOVIELENS_SEQ_LEN = 64
ENCODERS = ("swiglu", "attention")
SEQUENCES = 2  # the long history and its recent window
NEG = -1e4  # additive mask: finite, and exp(-1e4) is 0 in every float type (as in longer.py)


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=lambda: FeatureSchema(seq_len=MOVIELENS_SEQ_LEN))
    dim: int = 64            # D; divisible by heads and by T = 2·queries + user_tokens + item_tokens
    user_tokens: int = 3     # Mu NS tokens from the user columns
    item_tokens: int = 3     # Mi NS tokens from the item columns and dense features
    queries: int = 1         # query tokens per sequence
    recent: int = 8          # R: the second sequence is the R most recent behaviours
    heads: int = 4           # attention heads (cross attention; self-attention encoder)
    layers: int = 2
    encoder: str = "swiglu"  # "swiglu" (position-wise) or "attention" (self-attention)
    ffn_mult: int = 2
    emb_dim: int = 16        # e, per behaviour and per feature
    tasks: int = 1

    @property
    def tokens(self) -> int:
        return SEQUENCES * self.queries + self.user_tokens + self.item_tokens

    def __post_init__(self) -> None:
        if min(self.dim, self.user_tokens, self.item_tokens, self.queries, self.recent, self.heads, self.layers,
               self.ffn_mult, self.emb_dim, self.tasks) < 1:
            raise ValueError("dim, user_tokens, item_tokens, queries, recent, heads, layers, ffn_mult, emb_dim "
                             "and tasks must all be >= 1")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, found {self.encoder!r}")
        if self.dim % self.heads or self.dim % self.tokens:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads}) and by the token count "
                             f"T = 2·queries + user_tokens + item_tokens ({self.tokens})")
        if self.schema.seq_len < max(2, self.recent):
            raise ValueError(f"seq_len ({self.schema.seq_len}) must be at least recent ({self.recent}) and 2")


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config: S=64 and R=8, 3+3 NS + 2 query tokens (T=8), D=64, 4 heads, 2 layers."""
    return Config(schema=schema or FeatureSchema(seq_len=MOVIELENS_SEQ_LEN))


def base(schema: FeatureSchema | None = None) -> Config:
    """Benchmark config: S=1024 and R=50, 6+6 NS + 2×2 query tokens (T=16), D=256, 8 heads, 4 layers."""
    schema = schema or FeatureSchema(seq_len=1024, seq_vocab=5000)
    return Config(schema=schema, dim=256, user_tokens=6, item_tokens=6, queries=2, recent=50, heads=8, layers=4,
                  emb_dim=32)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:     # [B,L,D] -> [B,h,L,dh]
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _attend(qh: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """qh/k/v ``[B,h,L,dh]``, bias broadcastable to ``[B,h,Q,K]`` → ``[B,Q,D]``."""
    scores = torch.matmul(qh, k.transpose(-1, -2)) / math.sqrt(qh.shape[-1]) + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v)                   # [B,h,Q,dh]
    b, h, n, dh = out.shape
    return out.transpose(1, 2).reshape(b, n, h * dh)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class PositionwiseEncoder(nn.Module):
    """``H + SwiGLU(LN(H))`` on every position alone: ``[B,S,D]`` → ``[B,S,D]``."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c.dim)
        self.ffn = SwiGLU(c.dim, c.ffn_mult * c.dim)

    def forward(self, h: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        return h + self.ffn(self.norm(h))


class AttentionEncoder(nn.Module):
    """Pre-LN Transformer encoder layer over the valid positions: ``[B,S,D]`` → ``[B,S,D]``."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.norm = nn.LayerNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.o = nn.Linear(c.dim, c.dim)
        self.norm_ffn = nn.LayerNorm(c.dim)
        self.ffn = SwiGLU(c.dim, c.ffn_mult * c.dim)

    def forward(self, h: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(self.norm(h)).chunk(3, dim=-1))
        h = h + self.o(_attend(q, k, v, key_bias))
        return h + self.ffn(self.norm_ffn(h))


class SequenceLayer(nn.Module):
    """One sequence in one layer: encoder, its K/V, and its queries' cross attention."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.encoder = PositionwiseEncoder(c) if c.encoder == "swiglu" else AttentionEncoder(c)
        self.k = nn.Linear(c.dim, c.dim)
        self.v = nn.Linear(c.dim, c.dim)
        self.norm_q = nn.LayerNorm(c.dim)
        self.q = nn.Linear(c.dim, c.dim)
        self.o = nn.Linear(c.dim, c.dim)

    def kv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_heads(self.k(h), self.heads), _split_heads(self.v(h), self.heads)   # [B,h,S,dh]

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """Queries ``[n,B,D]`` (token-major) read ``K, V``: ``Q + CrossAttn(LN(Q))`` → ``[n,B,D]``."""
        qb = q.transpose(0, 1)                                                # [B,n,D]
        qh = _split_heads(self.q(self.norm_q(qb)), self.heads)
        return q + self.o(_attend(qh, k, v, key_bias)).transpose(0, 1)


class BoostBlock(nn.Module):
    """RankMixer block on ``[T,B,D]``: ``S = LN(Mix_T(X) + X)``, ``X' = LN(PFFN(S) + S)``."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        t = c.tokens
        self.tokens = t
        self.norm1 = nn.LayerNorm(c.dim)
        self.w1 = PerTokenLinear(t, c.dim, c.ffn_mult * c.dim)
        self.w2 = PerTokenLinear(t, c.ffn_mult * c.dim, c.dim)
        self.norm2 = nn.LayerNorm(c.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.norm1(token_mix(x, self.tokens) + x)
        return self.norm2(self.w2(F.gelu(self.w1(s))) + s)


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.seqs = nn.ModuleList(SequenceLayer(c) for _ in range(SEQUENCES))
        self.boost = BoostBlock(c)


class Model(RankingModel):
    family = FAMILY

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.user_chunk = -(-len(c.schema.user_vocab) * c.emb_dim // c.user_tokens)
        self.item_chunk = -(-self.embed.item_width // c.item_tokens)
        self.user_proj = PerTokenLinear(c.user_tokens, self.user_chunk, c.dim)
        self.item_proj = PerTokenLinear(c.item_tokens, self.item_chunk, c.dim)
        self.seq_proj = nn.ModuleList(nn.Linear(c.emb_dim, c.dim) for _ in range(SEQUENCES))
        self.recent_pos = nn.Parameter(torch.randn(c.recent, c.dim) * 0.02)
        n, ns = SEQUENCES * c.queries, c.user_tokens + c.item_tokens
        info = ns * c.dim + SEQUENCES * c.dim
        self.query_up = PerTokenLinear(n, info, c.ffn_mult * c.dim)        # FFN_i: one per query token
        self.query_down = PerTokenLinear(n, c.ffn_mult * c.dim, c.dim)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.head = Towers(c.dim, c.tasks)

    def input_specs(self) -> tuple[TensorSpec, ...]:
        specs = super().input_specs()  # the sequence axis is dynamic (at least `recent` items)
        return tuple(TensorSpec(s.name, s.dtype, ("batch", "seq"), s.role, s.vocab) if s.name == "seq_items" else s
                     for s in specs)

    def dim_multiples(self) -> dict[str, tuple[str, int]]:
        """One behaviour per cached position: ``seq`` = 1 · ``groups`` (the cache's axis), so every
        segment's sequence axes share one base (TensorRT profiles, runtime checks)."""
        return {"seq": ("groups", 1)}

    def dim_minimums(self) -> dict[str, int]:
        """The recent window reads the last ``recent`` items; a size-1 axis would not export."""
        return {"groups": max(2, self.config.recent)}

    def example_inputs(self, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
        schema = self.config.schema
        return random_feeds(dataclasses.replace(schema, seq_len=max(schema.seq_len, 2)), rows, seed)

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                seq_items: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = user_cat.shape[0]
        ucols = self.embed.user_table(user_cat + self.embed.user_offsets).reshape(b, -1)   # [B, Fu·e]
        ns_user = self.user_proj(chunk_tokens(ucols, c.user_tokens, self.user_chunk))      # [Mu,B,D]
        ns_item = self.item_proj(chunk_tokens(self.embed.item(item_cat, item_dense), c.item_tokens,
                                              self.item_chunk))                           # [Mi,B,D]
        # the sequences: the whole history and (by index, no special case when S == R) its last R items
        last = torch.arange(c.recent, device=seq_items.device) + (seq_items.shape[1] - c.recent)
        states, biases, pools = [], [], []
        for j, items in enumerate((seq_items, seq_items.index_select(1, last))):
            emb, valid = self.embed.sequence(items)                                         # [B,S_j,e], [B,S_j]
            h = self.seq_proj[j](emb)                                                       # [B,S_j,D]
            if j == 1:
                h = h + self.recent_pos
            valid = valid.to(h.dtype)
            pools.append((h * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0))
            biases.append(((1.0 - valid) * NEG)[:, None, None, :])                         # [B,1,1,S_j]
            states.append(h)
        ns = torch.cat([ns_user, ns_item], dim=0)                                           # [M,B,D]
        info = torch.cat([ns.transpose(0, 1).reshape(b, -1), *pools], dim=1)                # [B, M·D + 2D]
        n = SEQUENCES * c.queries
        q = self.query_down(F.gelu(self.query_up(info.unsqueeze(0).expand(n, -1, -1))))     # [N,B,D]
        for layer in self.layers:
            decoded = []
            for j, seq_layer in enumerate(layer.seqs):
                states[j] = seq_layer.encoder(states[j], biases[j])                        # user side only
                k, v = seq_layer.kv(states[j])                                              # K_l, V_l: cached
                decoded.append(seq_layer.decode(q[j * c.queries:(j + 1) * c.queries], k, v, biases[j]))
            x = layer.boost(torch.cat([*decoded, ns], dim=0))                               # [T,B,D]
            q, ns = x[:n], x[n:]
        return self.head(torch.cat([q, ns], dim=0).mean(0))

"""LONGER-style long-sequence model (arXiv 2505.04421): global tokens, token merge, cross attention
from global + recent tokens to the whole merged sequence in layer 1, self attention after.

Shapes (token axis second, ``[B, tokens, D]``; ``G = S / K`` merged groups)::

    seq_items [B,S] → item embeddings [B,S,e] → merge K adjacent → H [B,G,D]   (Linear(K·e → D))
    user tokens  Wu = [u, cls_1..cls_c, H_S]   u: user profile token, H_S: the k most recent groups
    target token t  (the candidate's features)                                          [B,1,D]
    layer 1   Wu ← Attn(q=Wu, kv=[u,cls ; H])    H_S sees H causally, never the global tokens
              t  ← Attn(q=t,  kv=[t ; u,cls ; H])                 the target sees everything
    layer l≥2 Wu ← Attn(q=Wu, kv=Wu)             H_S causal among H_S; u/cls see all of Wu
              t  ← Attn(q=t,  kv=[t ; Wu])
    out = MLP([t ; mean(valid Wu)]) → logit

Every attention is pre-LN with a residual, followed by a pre-LN GELU FFN, each layer with its own
weights shared by the user and target streams.

Choices where the paper is silent or where serving decides ([inferred]):
- **Position enters as a relative attention bias** (learnable per head, by distance in groups,
  bucketed, computed at query time) instead of an absolute position embedding added to the
  behaviours: the K/V of a merged behaviour then depend **only on its own items**, so a cached
  sequence can be extended by appending new behaviours — and slid — without recomputing old K/V.
- The user profile token and the CLS tokens never see the target (the target sits "at index 0",
  visible to nobody), so all of ``Wu`` is user-side and only the target runs per candidate.
- ``H_S`` is merged again from the last k·K items (the merge is per group, so this equals
  ``H[:, -k:]``) so that the per-user stream does not need the whole merged sequence.
- The sequence axis is dynamic (``S`` any multiple of K); sequences are left-padded with id 0
  (most recent last); padded groups are masked out as keys and in the pooling.
- InnerTransformer inside each group: not implemented (a plain concat + projection merge).
- Output head: the target's final state with the mean of the valid user tokens, then an MLP.

The family in prose, beside the others (math, these choices, the serving structure the passes
rely on): ``docs/models.md``, section ``longer``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mixexport.specs import TensorSpec

from .common import FeatureSchema, RankingModel, Towers, random_feeds

FAMILY = "longer"
DEFAULT_PASSES: tuple[str, ...] = ("extract-kv-cache",)
MOVIELENS_SEQ_LEN = 64
NEG = -1e4  # additive mask: finite (a query with no visible key gives a uniform row, not NaN) and
           # small enough that sums of masks stay inside fp16; exp(-1e4) is 0 in every float type


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=lambda: FeatureSchema(seq_len=MOVIELENS_SEQ_LEN))
    merge: int = 4           # K behaviours per merged token
    dim: int = 64            # D
    heads: int = 4
    layers: int = 3          # layer 1 cross attention + (layers - 1) self attention
    recent: int = 8          # k most recent merged tokens used as queries
    cls_tokens: int = 1
    ffn_mult: int = 2
    emb_dim: int = 16        # e, per behaviour and per feature
    bias_buckets: int = 32   # relative-distance buckets (in groups) of the attention bias
    tasks: int = 1

    def __post_init__(self) -> None:
        if min(self.merge, self.dim, self.heads, self.layers, self.recent, self.ffn_mult, self.tasks) < 1:
            raise ValueError("merge, dim, heads, layers, recent, ffn_mult and tasks must all be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.schema.seq_len % self.merge or self.schema.seq_len // self.merge < self.recent:
            raise ValueError(f"seq_len ({self.schema.seq_len}) must be a multiple of merge ({self.merge}) "
                             f"with at least recent ({self.recent}) groups")


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config: S=64, K=4 (16 merged tokens), D=64, 4 heads, 3 layers, k=8 recent."""
    return Config(schema=schema or FeatureSchema(seq_len=MOVIELENS_SEQ_LEN))


def base(schema: FeatureSchema | None = None) -> Config:
    """Benchmark config: S=1024, K=8 (128 merged tokens), D=256, 8 heads, 4 layers, k=32 recent."""
    schema = schema or FeatureSchema(seq_len=1024, seq_vocab=5000)
    return Config(schema=schema, merge=8, dim=256, heads=8, layers=4, recent=32, cls_tokens=2, emb_dim=32)


class Attention(nn.Module):
    """Multi-head attention with an additive bias; q ``[B,Q,D]``, kv ``[B,K,D]``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:      # [B,L,D] -> [B,h,L,dh]
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(x)), self.split(self.v(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q ``[B,Q,D]`` (unprojected), k/v ``[B,h,K,dh]``, bias broadcastable to ``[B,h,Q,K]``."""
        qh = self.split(self.q(q))                                           # [B,h,Q,dh]
        scores = torch.matmul(qh, k.transpose(-1, -2)) / math.sqrt(qh.shape[-1]) + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)                 # [B,h,Q,dh]
        b, h, n, dh = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, h * dh))


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(c.dim)
        self.norm_kv = nn.LayerNorm(c.dim)
        self.attn = Attention(c.dim, c.heads)
        self.norm_ffn = nn.LayerNorm(c.dim)
        self.ffn = nn.Sequential(nn.Linear(c.dim, c.ffn_mult * c.dim), nn.GELU(), nn.Linear(c.ffn_mult * c.dim, c.dim))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.kv(self.norm_kv(x))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.attend(self.norm_q(x), k, v, bias)
        return x + self.ffn(self.norm_ffn(x))


class Model(RankingModel):
    family = FAMILY

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.merge_proj = nn.Linear(c.merge * c.emb_dim, c.dim)
        self.user_proj = nn.Linear(len(c.schema.user_vocab) * c.emb_dim, c.dim)
        self.target_proj = nn.Linear(self.embed.item_width, c.dim)
        self.cls = nn.Parameter(torch.randn(c.cls_tokens, c.dim) * 0.02)
        self.rel_bias = nn.Parameter(torch.zeros(c.layers, c.heads, c.bias_buckets))
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.head = Towers(2 * c.dim, c.tasks)

    def input_specs(self) -> tuple[TensorSpec, ...]:
        specs = super().input_specs()  # the sequence axis is dynamic: any multiple of `merge`
        return tuple(TensorSpec(s.name, s.dtype, ("batch", "seq"), s.role, s.vocab) if s.name == "seq_items" else s
                     for s in specs)

    def dim_multiples(self) -> dict[str, tuple[str, int]]:
        return {"seq": ("groups", self.config.merge)}

    def dim_minimums(self) -> dict[str, int]:
        """The model reads the ``recent`` last groups, so a sequence holds at least that many."""
        return {"groups": self.config.recent}

    def example_inputs(self, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Rows with at least two merged positions: torch.export turns a size-1 axis into a constant."""
        schema = self.config.schema
        return random_feeds(dataclasses.replace(schema, seq_len=max(schema.seq_len, 2 * self.config.merge)), rows, seed)

    def merged(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge K adjacent behaviours: items ``[B,S]`` → tokens ``[B,S/K,D]`` and validity ``[B,S/K]``."""
        b = items.shape[0]
        emb, mask = self.embed.sequence(items)                               # [B,S,e], [B,S]
        k = self.config.merge
        tokens = self.merge_proj(emb.reshape(b, -1, k * self.config.emb_dim))
        valid = (mask.reshape(b, -1, k).sum(-1) > 0).to(emb.dtype)          # [B,G]
        return tokens, valid

    def _bias(self, layer: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Relative-position bias ``[h,Q,K]`` from group distances (query − key, clamped)."""
        dist = (q_pos[:, None] - k_pos[None, :]).clamp(0, self.config.bias_buckets - 1)
        return self.rel_bias[layer][:, dist]

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                seq_items: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = user_cat.shape[0]
        kk = c.recent * c.merge
        seq_tok, valid = self.merged(seq_items)                              # [B,G,D], [B,G]
        # the last k·K items by index (== seq_tok[:, -k:] after merging); an index rather than a slice
        # keeps the exported program free of a special case when the window holds exactly k groups
        last = torch.arange(kk, device=seq_items.device) + (seq_items.shape[1] - kk)
        recent, recent_valid = self.merged(seq_items.index_select(1, last))        # [B,k,D], [B,k]
        groups = seq_tok.shape[1]
        dt = seq_tok.dtype  # masks in the compute dtype, so the model also runs in fp16/bf16
        user_tok = self.user_proj(self.embed.user_table(user_cat + self.embed.user_offsets).reshape(b, 1, -1))
        glob = torch.cat([user_tok, self.cls.expand(b, -1, -1)], dim=1)     # [B,m,D] user-only globals
        m = glob.shape[1]
        wu = torch.cat([glob, recent], dim=1)                               # [B,m+k,D] user stream
        target = self.target_proj(self.embed.item(item_cat, item_dense)).unsqueeze(1)   # [B,1,D]

        seq_pos = torch.arange(groups, device=seq_items.device)
        rec_pos = seq_pos[-c.recent:]
        key_mask_seq = (1.0 - valid)[:, None, None, :] * NEG                 # [B,1,1,G]
        key_mask_rec = (1.0 - recent_valid)[:, None, None, :] * NEG          # [B,1,1,k]
        end = torch.full((m,), groups, device=seq_items.device)             # globals look from the end
        # user-stream mask, layer 1: globals see globals + all groups; H_S sees earlier groups only
        causal = (rec_pos[:, None] >= seq_pos[None, :]).to(valid.dtype)      # [k,G]
        hs_mask_1 = torch.cat([torch.full((c.recent, m), NEG, dtype=dt), (1.0 - causal) * NEG], dim=1)  # [k,m+G]
        user_mask_1 = torch.cat([torch.zeros(m, m + groups, dtype=dt), hs_mask_1], dim=0)               # [m+k,m+G]
        causal_k = (rec_pos[:, None] >= rec_pos[None, :]).to(valid.dtype)   # [k,k]
        hs_mask_n = torch.cat([torch.full((c.recent, m), NEG, dtype=dt), (1.0 - causal_k) * NEG], dim=1)
        user_mask_n = torch.cat([torch.zeros(m, m + c.recent, dtype=dt), hs_mask_n], dim=0)           # [m+k,m+k]
        q_user_pos = torch.cat([end, rec_pos])
        for i, layer in enumerate(self.layers):
            # keep the parts separate so that what crosses to the per-candidate side is visible:
            # the sequence K/V (cacheable, per merged position) apart from the global tokens' K/V
            if i == 0:
                kg, vg = layer.kv(glob)
                ks, vs = layer.kv(seq_tok)                                   # [B,h,G,dh] the KV cache
                ctx_k, ctx_v, ctx_pos = [kg, ks], [vg, vs], torch.cat([end, seq_pos])
                ctx_mask, user_mask = [torch.zeros(b, 1, 1, m, dtype=dt), key_mask_seq], user_mask_1
            else:
                kw, vw = layer.kv(wu)
                ctx_k, ctx_v, ctx_pos = [kw], [vw], q_user_pos
                ctx_mask, user_mask = [torch.zeros(b, 1, 1, m, dtype=dt), key_mask_rec], user_mask_n
            user_bias = self._bias(i, q_user_pos, ctx_pos) + user_mask + torch.cat(ctx_mask, dim=-1)
            # the target sees itself and everything the user stream reads in this layer
            kt, vt = layer.kv(target)
            t_bias = (self._bias(i, end[:1], torch.cat([end[:1], ctx_pos]))
                      + torch.cat([torch.zeros(b, 1, 1, 1, dtype=dt), *ctx_mask], dim=-1))
            target = layer(target, torch.cat([kt, *ctx_k], 2), torch.cat([vt, *ctx_v], 2), t_bias)
            wu = layer(wu, torch.cat(ctx_k, 2), torch.cat(ctx_v, 2), user_bias)
        weights = torch.cat([torch.ones(b, m, dtype=dt), recent_valid], dim=1).unsqueeze(-1)    # [B,m+k,1]
        pooled = (wu * weights).sum(1) / weights.sum(1)
        return self.head(torch.cat([target.squeeze(1), pooled], dim=-1))

"""MSN, a memory-based sparse network (arXiv 2602.07526): a large parameter memory read sparsely
through product keys (Lample et al., arXiv 1907.05242) and gated into a RankMixer backbone.

Product-key memory read, per query head h (``n`` sub-keys per half, ``N = n²`` slots, top-k ``k``)::

    q_h = W_q x              [B,dq]   split into halves q1, q2, each L2-normalised
    s1 = τ·q1·K1_hᵀ [B,n],   s2 = τ·q2·K2_hᵀ [B,n]      (sub-keys K1_h, K2_h L2-normalised rows)
    (v1, i1) = topk(s1, k),  (v2, i2) = topk(s2, k)
    candidates: v1[a] + v2[b], slot i1[a]·n + i2[b]   (k² pairs) → (v, slot) = topk(·, k)
    m = Σ_h Σ_j softmax(v)_j · V[slot_j]           V [N, dv], shared by the heads (one Gather)

Backbone: RankMixer over T = Tu + Tg tokens (user and item tokens tokenized separately, then
concatenated and mixed with H = T); after block ``memory_after`` the memory is fused into every
token through a gate: ``h' = h + σ(h·W_g) ⊙ (m·W_o)``; then the remaining blocks, mean, towers.

Choices where the paper is silent ([inferred]):
- **The query** (``query``): ``pooled`` (default, the reference reading): the mean of the backbone's
  tokens after block ``memory_after`` — it reads the candidate, so the memory read runs per
  candidate; ``user``: a projection of the user features (user columns + pooled sequence) — the
  read is then user-side and ``split-user-item`` moves it into the user segment.
- **Normalised keys**: sub-keys and query halves are L2-normalised and the cosine scores are scaled
  by a learned temperature τ (initialised to ``score_scale``); this keeps scores bounded (no key
  wins by norm alone) — our rendering of the paper's normalisation against retrieval collapse. The
  over-parameterisation of the keys is not reproduced.
- Each head has its own sub-key tables; the heads share the value table and their reads are summed.
- The slot index is formed without division: the k² candidate slots are built first
  (``i1·n + i2``) and the top-k pairs are gathered from them (GatherElements), so the graph holds
  only TopK, Gather and integer Mul/Add, all with static k.
- The value table is initialised N(0, dv^-1/2) as in PKM; the gate ``W_g`` is per token-shared
  ``Linear(D, D)``, ``W_o`` is ``Linear(dv, D)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .common import FeatureSchema, PerTokenLinear, RankingModel, Towers, chunk_tokens
from .rankmixer import Block

FAMILY = "msn"
DEFAULT_PASSES: tuple[str, ...] = ()
QUERIES = ("pooled", "user")


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=FeatureSchema)
    user_tokens: int = 4     # Tu
    item_tokens: int = 4     # Tg
    dim: int = 64            # D; divisible by T = Tu + Tg
    ffn_mult: int = 4
    layers: int = 2
    memory_after: int = 1    # the memory is fused after this many backbone blocks (1..layers)
    sub_keys: int = 32       # n: sub-keys per half; the memory has n² slots
    memory_heads: int = 2
    top_k: int = 8           # k, static (<= n)
    query_dim: int = 32      # dq, even, >= 4
    value_dim: int = 32      # dv
    score_scale: float = 10.0
    query: str = "pooled"    # "pooled" (per candidate) or "user" (user-side)
    emb_dim: int = 16
    tasks: int = 1

    def __post_init__(self) -> None:
        if min(self.user_tokens, self.item_tokens, self.dim, self.ffn_mult, self.layers, self.sub_keys,
               self.memory_heads, self.top_k, self.query_dim, self.value_dim, self.emb_dim, self.tasks) < 1:
            raise ValueError("token counts, dim, ffn_mult, layers, sub_keys, memory_heads, top_k, query_dim, "
                             "value_dim, emb_dim and tasks must all be >= 1")
        if self.dim % (self.user_tokens + self.item_tokens):
            raise ValueError(f"dim ({self.dim}) must be divisible by user_tokens + item_tokens "
                             f"({self.user_tokens + self.item_tokens}): mixing uses H = T heads")
        if not 1 <= self.memory_after <= self.layers:
            raise ValueError(f"memory_after ({self.memory_after}) must be in 1..layers ({self.layers})")
        if self.top_k > self.sub_keys:
            raise ValueError(f"top_k ({self.top_k}) must be <= sub_keys ({self.sub_keys})")
        if self.query_dim % 2 or self.query_dim < 4:
            raise ValueError(f"query_dim ({self.query_dim}) must be even and >= 4: it is split into two "
                             "L2-normalised halves, and a half of width 1 normalises to ±1 (TopK ties)")
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, found {self.query!r}")

    @property
    def slots(self) -> int:
        return self.sub_keys ** 2


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config: Tu = Tg = 4, D = 64, L = 2; memory 32² = 1,024 slots × 32, 2 heads, top-8."""
    return Config(schema=schema or FeatureSchema())


def base(schema: FeatureSchema | None = None) -> Config:
    """Benchmark config: Tu = Tg = 8, D = 256; memory 256² = 65,536 slots × 128 (32 MiB), 4 heads, top-16."""
    return Config(schema=schema or FeatureSchema(), user_tokens=8, item_tokens=8, dim=256, sub_keys=256,
                  memory_heads=4, top_k=16, query_dim=64, value_dim=128, emb_dim=32)


def large(schema: FeatureSchema | None = None) -> Config:
    """The > 2 GB memory of ``benchmarks/msn_large.py``: 1024² = 2^20 slots × 512 floats (2 GiB)."""
    return Config(schema=schema or FeatureSchema(), sub_keys=1024, value_dim=512, top_k=16,
                  memory_heads=4, query_dim=64)


class ProductKeyMemory(nn.Module):
    """query ``[B, heads·dq]`` → memory read ``[B, dv]`` (see the module docstring)."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.n, self.k, self.heads, self.half = c.sub_keys, c.top_k, c.memory_heads, c.query_dim // 2
        self.keys1 = nn.Parameter(torch.randn(c.memory_heads, c.sub_keys, self.half))
        self.keys2 = nn.Parameter(torch.randn(c.memory_heads, c.sub_keys, self.half))
        self.temperature = nn.Parameter(torch.tensor(float(c.score_scale)))
        self.values = nn.Embedding(c.slots, c.value_dim)
        nn.init.normal_(self.values.weight, std=c.value_dim ** -0.5)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        b = q.shape[0]
        q = q.reshape(b, self.heads, 2, self.half)
        q = F.normalize(q, dim=-1)                                                 # [B,h,2,dq/2]
        # keys as the MatMul's A operand ([h,n,dq/2] @ [B,h,dq/2,1]): the exporter folds the normalised
        # keys into a constant, and as A (not a weight B) quantize-w8a16 leaves them float, so weight
        # rounding never moves the TopK choices through the keys
        k1 = F.normalize(self.keys1, dim=-1)                                       # [h,n,dq/2]
        k2 = F.normalize(self.keys2, dim=-1)
        s1 = torch.matmul(k1, q[:, :, 0].unsqueeze(-1)).squeeze(-1) * self.temperature  # [B,h,n]
        s2 = torch.matmul(k2, q[:, :, 1].unsqueeze(-1)).squeeze(-1) * self.temperature
        v1, i1 = torch.topk(s1, self.k, dim=-1)                                   # [B,h,k]
        v2, i2 = torch.topk(s2, self.k, dim=-1)
        scores = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).reshape(b, self.heads, self.k * self.k)
        slots = (i1.unsqueeze(-1) * self.n + i2.unsqueeze(-2)).reshape(b, self.heads, self.k * self.k)
        top, pick = torch.topk(scores, self.k, dim=-1)                            # [B,h,k]
        slot = torch.gather(slots, -1, pick)                                      # [B,h,k]
        weights = torch.softmax(top, dim=-1)
        rows = self.values(slot)                                                  # [B,h,k,dv]
        return (rows * weights.unsqueeze(-1)).sum(dim=(1, 2))                     # [B,dv]


class MemoryGate(nn.Module):
    """``h' = h + σ(h·W_g) ⊙ (m·W_o)``: h ``[T,B,D]``, m ``[B,dv]``."""

    def __init__(self, dim: int, value_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, dim)
        self.out = nn.Linear(value_dim, dim)

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return h + torch.sigmoid(self.gate(h)) * self.out(m).unsqueeze(0)


class Model(RankingModel):
    family = FAMILY

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        tokens = c.user_tokens + c.item_tokens
        self.user_chunk = math.ceil(self.embed.user_width / c.user_tokens)
        self.item_chunk = math.ceil(self.embed.item_width / c.item_tokens)
        self.user_tokenizer = PerTokenLinear(c.user_tokens, self.user_chunk, c.dim)
        self.item_tokenizer = PerTokenLinear(c.item_tokens, self.item_chunk, c.dim)
        self.blocks = nn.ModuleList(Block(tokens, c.dim, c.ffn_mult) for _ in range(c.layers))
        self.query = nn.Linear(c.dim if c.query == "pooled" else self.embed.user_width,
                               c.memory_heads * c.query_dim)
        self.memory = ProductKeyMemory(c)
        self.memory_gate = MemoryGate(c.dim, c.value_dim)
        self.head = Towers(c.dim, c.tasks)

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                seq_items: torch.Tensor) -> torch.Tensor:
        c = self.config
        user_emb = self.embed.user(user_cat, seq_items)                                  # [B,Eu]
        u = self.user_tokenizer(chunk_tokens(user_emb, c.user_tokens, self.user_chunk))  # [Tu,B,D]
        g = self.item_tokenizer(chunk_tokens(self.embed.item(item_cat, item_dense), c.item_tokens,
                                             self.item_chunk))                          # [Tg,B,D]
        x = torch.cat([u, g], dim=0)                                                     # [T,B,D]
        # a user query is computed before the tokens meet, so its read stays user-side
        mem = self.memory(self.query(user_emb)) if c.query == "user" else None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i + 1 == c.memory_after:
                if mem is None:
                    mem = self.memory(self.query(x.mean(0)))                             # [B,dv]
                x = self.memory_gate(x, mem)
        return self.head(x.mean(0))                                                      # [B,tasks]

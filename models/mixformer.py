"""MixFormer (arXiv 2602.14110): one decoder-style backbone for feature interaction and the
behaviour sequence. H head tokens (the non-sequential features) are mixed, attend over the
sequence with per-head keys and values, and are fused; UI-MixFormer splits the heads into user
heads and item heads with a one-way mask so that the user heads never read item information.

Block l (pre-norm; every ``SwiGLU_i`` is per head, no biases; ``D`` the head width, H = T heads)::

    P   = HeadMix(LN(X)) + X                      Query Mixer, HeadMix = RankMixer mixing, H = T
    Q   = P + SwiGLU_i(LN(P))                     per-head SwiGLU                    [H,B,D]
    h_l = h_{l-1} + SwiGLU_l(LN(h_{l-1}))         per-layer SwiGLU over the actions  [B,S,A]
    K_l, V_l = h_l·Wk_l, h_l·Wv_l                 per-head keys/values, [A, H·D] → [H,B,S,D]
    Z_i = Σ_t softmax_t(q_i·k_t^i / √D) v_t^i + q_i       cross attention, padding masked
    X'  = Z + SwiGLU_i(LN(Z))                     output fusion
    logit = Towers(mean_i X_L[i])

UI-MixFormer (``ui=True``, the default): the tokens are ``X = [U ; G]`` with ``U [Hu,B,D]`` cut
from the user features (profile columns + pooled sequence) and ``G [Hi,B,D]`` from the item
features, **kept as separate tensors** so that a generic graph pass sees the boundary. HeadMix
gets UG-Sep's one-way mask: mixed token h < Hu (a user head) takes the user tokens' h-th slices and
zeros where the item tokens' slices would be; the item heads take every slice. Per head everything
else (norms, SwiGLUs, the head's own K/V and attention) reads one head only, so the user heads,
their cross attention and the sequence K/V depend on user data alone and run once per user
(``split-user-item``); the item heads run per candidate. With ``ui=False`` (plain MixFormer) the
user and item features are concatenated and cut into the H heads, so every head carries item
information from the tokenizer on, and ``split-user-item`` refuses it (only the sequence is
user-only).

Choices where the paper is silent ([inferred]):
- **Norm** is LayerNorm (one per sub-layer, shared by the heads, applied to U and G separately);
  the SwiGLU hidden width is ``ffn_mult · D`` and the down projections start at 0.1× their
  uniform init, so that each block starts close to the identity (trains stably from scratch);
- **queries are the head tokens themselves** (no query projection), and each head has its own
  D-wide key and value projection of the action representation, as ``q_iᵀ k_t^i / √D`` implies;
- **the action representation is recursive and narrow**: ``h_0`` is a linear projection of each
  behaviour's item embedding to width ``A = action_dim`` (default 16, below D: the per-head K/V
  projections ``[A, H·D]`` run for every action, and they dominate the cost), and layer l refines
  ``h_{l-1}`` with its own residual SwiGLU (hidden ``n·A``). There is **no
  position code**, so K/V of an action depend on that action alone (a cached sequence could be
  appended to); padded actions (id 0) are masked out of the softmax with an additive −1e4
  (finite, fp16-safe: an all-padding history gives a uniform row, not NaN);
- tokenization: per head its own projection ``[H, chunk, D]`` of an equal chunk of the
  concatenated features (RankMixer's semantic tokenization), separately for the user and the
  item group in the UI variant; the user group includes the masked mean of the sequence
  embeddings (the same user features every family reads);
- readout: mean over all heads → per-task towers.

The family in prose, beside the others (math, these choices, the serving structure the passes
rely on): ``docs/models.md``, section ``mixformer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .common import FeatureSchema, PerTokenLinear, RankingModel, Towers, chunk_tokens, token_mix
from .tokenmixer_large import SwiGLU

FAMILY = "mixformer"
DEFAULT_PASSES: tuple[str, ...] = ("split-user-item",)   # UI-MixFormer's; see default_passes
DOWN_INIT = 0.1
NEG = -1e4  # additive padding mask (see the module docstring)


@dataclass(frozen=True)
class Config:
    schema: FeatureSchema = field(default_factory=FeatureSchema)
    heads: int = 4           # H head tokens (= mixing heads, H = T)
    user_heads: int = 2      # Hu user heads of UI-MixFormer (the other H - Hu are item heads)
    ui: bool = True          # UI-MixFormer: user/item heads with the one-way mask; False: plain MixFormer
    dim: int = 32            # D, head width; divisible by H
    action_dim: int = 16     # A, width of the action (behaviour) representation; K/V project it to D per head
    ffn_mult: int = 2        # n: SwiGLU hidden width n·D
    layers: int = 2          # L
    emb_dim: int = 16
    tasks: int = 1

    def __post_init__(self) -> None:
        if min(self.heads, self.dim, self.action_dim, self.ffn_mult, self.layers, self.tasks) < 1:
            raise ValueError("heads, dim, action_dim, ffn_mult, layers and tasks must all be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads}): "
                             "head mixing uses H = T heads of width D/H")
        if self.ui and not 1 <= self.user_heads < self.heads:
            raise ValueError(f"UI-MixFormer needs 1 <= user_heads < heads (at least one user and one item "
                             f"head), found user_heads={self.user_heads}, heads={self.heads}")

    @property
    def groups(self) -> tuple[int, ...]:
        """Head counts of the head groups: ``(Hu, Hi)`` for UI-MixFormer, ``(H,)`` otherwise."""
        return (self.user_heads, self.heads - self.user_heads) if self.ui else (self.heads,)


def default_passes(config: Config) -> tuple[str, ...]:
    """``split-user-item`` for UI-MixFormer; none for plain MixFormer, which the split refuses."""
    return DEFAULT_PASSES if config.ui else ()


def tiny(schema: FeatureSchema | None = None) -> Config:
    """Test config: H = 4 heads (2 user + 2 item), D = 32, A = 16, n = 2, L = 2 (~0.11 M block
    parameters, ~0.6 MFLOPs per row)."""
    return Config(schema=schema or FeatureSchema())


def base(schema: FeatureSchema | None = None) -> Config:
    """Benchmark config: H = 8 heads (4 user + 4 item), D = 128, A = 64, n = 2, L = 2, S = 64
    actions (~3.5 M block parameters; ~47 MFLOPs per row, 85 % of it on the sequence side: the
    per-layer SwiGLU over the 64 actions and their per-head K/V)."""
    return Config(schema=schema or FeatureSchema(seq_len=64, seq_vocab=5000), heads=8, user_heads=4,
                  dim=128, action_dim=64, emb_dim=32)


def masked_head_mix(u: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HeadMix with the one-way UI mask: U ``[Hu,B,D]``, G ``[Hi,B,D]`` → the mixed user heads
    ``[Hu,B,D]`` (user slices, zeros for the item slices) and item heads ``[Hi,B,D]`` (all slices)."""
    hu, hi = u.shape[0], g.shape[0]
    b, d = u.shape[1], u.shape[2]
    dh = d // (hu + hi)
    uh = u.reshape(hu, b, hu + hi, dh)                                                  # [Hu,B,H,dh]
    gh = g.reshape(hi, b, hu + hi, dh)                                                  # [Hi,B,H,dh]
    mix_u = F.pad(uh[:, :, :hu].permute(2, 1, 0, 3).reshape(hu, b, hu * dh), (0, hi * dh))   # [Hu,B,D]
    mix_g = torch.cat([uh[:, :, hu:].permute(2, 1, 0, 3).reshape(hi, b, hu * dh),
                       gh[:, :, hu:].permute(2, 1, 0, 3).reshape(hi, b, hi * dh)], dim=-1)  # [Hi,B,D]
    return mix_u, mix_g


class ActionSwiGLU(nn.Module):
    """One bias-free SwiGLU for every action, 2-D weights: ``[B,S,A]`` → ``[B,S,A]``.

    (Not a per-token SwiGLU with one token: TensorRT-RTX 1.7 fails to build a ``[1, A, nA]``
    weight behind a blocked int8 DequantizeLinear — Myelin internal error — measured on CPU builds.)
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        with torch.no_grad():
            self.down.weight.mul_(DOWN_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """One MixFormer block over the head groups (``[U, G]`` or ``[X]``) and the actions."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.ui, self.heads, self.dim = c.ui, c.heads, c.dim
        hidden = c.ffn_mult * c.dim
        self.norm_mix = nn.LayerNorm(c.dim)
        self.norm_query = nn.LayerNorm(c.dim)
        self.query_ffn = nn.ModuleList(SwiGLU(n, c.dim, hidden, DOWN_INIT) for n in c.groups)
        self.norm_seq = nn.LayerNorm(c.action_dim)
        self.seq_ffn = ActionSwiGLU(c.action_dim, c.ffn_mult * c.action_dim)           # every action alike
        self.key = nn.Linear(c.action_dim, c.heads * c.dim, bias=False)                 # per head [A, D]
        self.value = nn.Linear(c.action_dim, c.heads * c.dim, bias=False)
        self.norm_out = nn.LayerNorm(c.dim)
        self.out_ffn = nn.ModuleList(SwiGLU(n, c.dim, hidden, DOWN_INIT) for n in c.groups)

    def sequence(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Actions ``[B,S,A]`` → refined actions ``[B,S,A]``, keys ``[H,B,D,S]``, values ``[H,B,S,D]``."""
        b, s, _ = h.shape
        d = self.dim
        h = h + self.seq_ffn(self.norm_seq(h))                                          # [B,S,A]
        k = self.key(h).reshape(b, s, self.heads, d).permute(2, 0, 3, 1)                 # [H,B,D,S]
        v = self.value(h).reshape(b, s, self.heads, d).permute(2, 0, 1, 3)               # [H,B,S,D]
        return h, k, v

    def forward(self, xs: list[torch.Tensor], h: torch.Tensor,
                pad: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Head groups ``[Hg,B,D]``, actions ``h [B,S,A]``, padding bias ``[1,B,1,S]``."""
        normed = [self.norm_mix(x) for x in xs]
        mixed = list(masked_head_mix(*normed)) if self.ui else [token_mix(normed[0], self.heads)]
        ps = [m + x for m, x in zip(mixed, xs)]                                          # Query Mixer
        qs = [p + ffn(self.norm_query(p)) for p, ffn in zip(ps, self.query_ffn)]         # [Hg,B,D]
        h, k, v = self.sequence(h)
        out, lo = [], 0
        for q, ffn in zip(qs, self.out_ffn):
            hi = lo + q.shape[0]
            scores = torch.matmul(q.unsqueeze(2), k[lo:hi]) / math.sqrt(self.dim) + pad   # [Hg,B,1,S]
            z = torch.matmul(torch.softmax(scores, dim=-1), v[lo:hi]).squeeze(2) + q     # [Hg,B,D]
            out.append(z + ffn(self.norm_out(z)))                                        # output fusion
            lo = hi
        return out, h


class Model(RankingModel):
    family = FAMILY

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        widths = (self.embed.user_width, self.embed.item_width) if c.ui else (
            self.embed.user_width + self.embed.item_width,)
        self.chunks = tuple(math.ceil(w / n) for w, n in zip(widths, c.groups))
        self.tokenizers = nn.ModuleList(PerTokenLinear(n, ch, c.dim) for n, ch in zip(c.groups, self.chunks))
        self.action = nn.Linear(c.emb_dim, c.action_dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.head = Towers(c.dim, c.tasks)

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor,
                seq_items: torch.Tensor) -> torch.Tensor:
        c = self.config
        user = self.embed.user(user_cat, seq_items)                       # [B,Eu]
        item = self.embed.item(item_cat, item_dense)                      # [B,Ei]
        feats = [user, item] if c.ui else [torch.cat([user, item], dim=1)]
        xs = [tok(chunk_tokens(f, n, ch))                                 # [Hg,B,D] per head group
              for f, n, ch, tok in zip(feats, c.groups, self.chunks, self.tokenizers)]
        emb, valid = self.embed.sequence(seq_items)                       # [B,S,e], [B,S]
        h = self.action(emb)                                              # [B,S,A]
        pad = ((1.0 - valid) * NEG).to(h.dtype)[None, :, None, :]         # [1,B,1,S]
        for block in self.blocks:
            xs, h = block(xs, h, pad)
        pooled = torch.cat(xs, dim=0).mean(0)                             # [B,D]
        return self.head(pooled)                                          # [B,tasks]

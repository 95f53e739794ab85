"""SASRec-style next-item model: causal self-attention over the behaviour sequence (int32 ids, padding
id 0 masked as keys), the last position's hidden state scored against the candidate's embedding by a
dot product. The sequence length is a dynamic axis, exported with ``Dim("seq", min=2, max=200)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.corpus.common import batch_dims

ITEMS = 50
MAX_SEQ = 200


class SASRec(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(ITEMS, dim, padding_idx=0)
        self.pos = nn.Embedding(MAX_SEQ, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, seq_items: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        ids = seq_items.long()
        s = ids.shape[1]
        x = self.item_emb(ids) + self.pos(torch.arange(s, device=ids.device))           # [B, S, D]
        att = (self.q(x) @ self.k(x).transpose(1, 2)) / x.shape[-1] ** 0.5              # [B, S, S]
        causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        keep = causal & (ids != 0).unsqueeze(1) | torch.eye(s, dtype=torch.bool, device=ids.device)
        h = self.norm(x + att.masked_fill(~keep, float("-inf")).softmax(-1) @ self.v(x))
        h = self.norm(h + self.ffn(h))                                                  # [B, S, D]
        target = self.item_emb(item_id.long())                                          # [B, D]
        return (h[:, -1] * target).sum(1, keepdim=True)                                 # [B, 1]


def build(batch: int = 4, seq: int = 6, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = {"seq_items": torch.randint(0, ITEMS, (batch, seq), dtype=torch.int32),
              "item_id": torch.randint(1, ITEMS, (batch,), dtype=torch.int32)}
    return SASRec(**config), inputs, batch_dims(inputs, {"seq_items": {1: torch.export.Dim("seq", min=2, max=MAX_SEQ)}})

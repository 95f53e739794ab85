"""DIN (Deep Interest Network), torch-rechub style: target attention of the candidate over the
user's behaviour history, with the ids cast by ``.long()`` before every lookup (the inputs arrive
as int32) and padding id 0 masking history positions.

The user side is substantial: a user tower over the profile, the history's embeddings and mask.
``split-user-item`` cuts those into the user segment; the target attention (which reads the
candidate) is the item segment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.corpus.common import batch_dims

USERS, ITEMS, CATS = 50, 60, 7


class DIN(nn.Module):
    def __init__(self, dim: int = 8, dense: int = 4, tower: int = 32, att: int = 16) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(USERS, dim)
        self.item_emb = nn.Embedding(ITEMS, dim, padding_idx=0)
        self.cat_emb = nn.Embedding(CATS, dim)
        self.user_tower = nn.Sequential(nn.Linear(dim + dense, tower), nn.ReLU(), nn.Linear(tower, tower),
                                        nn.ReLU(), nn.Linear(tower, dim))
        self.att = nn.Sequential(nn.Linear(4 * dim, att), nn.Sigmoid(), nn.Linear(att, 1))
        self.head = nn.Sequential(nn.Linear(4 * dim, att), nn.ReLU(), nn.Linear(att, 1))

    def forward(self, user_id: torch.Tensor, user_dense: torch.Tensor, seq_items: torch.Tensor,
                item_id: torch.Tensor, item_cat: torch.Tensor) -> torch.Tensor:
        u = self.user_tower(torch.cat([self.user_emb(user_id.long()), user_dense], 1))  # [B, D]
        hist = self.item_emb(seq_items.long())                                         # [B, T, D]
        mask = (seq_items != 0).unsqueeze(-1).float()                                   # [B, T, 1]
        q = self.item_emb(item_id.long())                                               # [B, D]
        qe = q.unsqueeze(1).expand_as(hist)                                             # [B, T, D]
        w = self.att(torch.cat([qe, hist, qe - hist, qe * hist], -1)) * mask            # [B, T, 1]
        pooled = (w * hist).sum(1)                                                      # [B, D]
        c = self.cat_emb(item_cat.long())                                               # [B, D]
        return torch.sigmoid(self.head(torch.cat([u, pooled, q, c], 1)))               # [B, 1]


def build(batch: int = 4, seq: int = 6, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = {"user_id": torch.randint(0, USERS, (batch,), dtype=torch.int32),
              "user_dense": torch.randn(batch, 4),
              "seq_items": torch.randint(0, ITEMS, (batch, seq), dtype=torch.int32),
              "item_id": torch.randint(1, ITEMS, (batch,), dtype=torch.int32),
              "item_cat": torch.randint(0, CATS, (batch,), dtype=torch.int32)}
    return DIN(**config), inputs, batch_dims(inputs)

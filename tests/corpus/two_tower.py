"""DSSM-style two-tower retrieval/ranking model: a deep user tower (profile, dense features and the
mean of the behaviour history) and a light item tower, scored by a dot product.

The user tower is most of the FLOPs, so ``split-user-item`` runs it once per user and only the item
tower and the dot product per candidate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.corpus.common import batch_dims

USERS, ITEMS, CATS = 40, 50, 6


class TwoTower(nn.Module):
    def __init__(self, dim: int = 8, dense: int = 4, user_hidden: int = 64, item_hidden: int = 16,
                 out: int = 8) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(USERS, dim)
        self.item_emb = nn.Embedding(ITEMS, dim, padding_idx=0)
        self.cat_emb = nn.Embedding(CATS, dim)
        self.user_tower = nn.Sequential(nn.Linear(2 * dim + dense, user_hidden), nn.ReLU(),
                                        nn.Linear(user_hidden, user_hidden), nn.ReLU(),
                                        nn.Linear(user_hidden, out))
        self.item_tower = nn.Sequential(nn.Linear(2 * dim, item_hidden), nn.ReLU(), nn.Linear(item_hidden, out))

    def forward(self, user_id: torch.Tensor, user_dense: torch.Tensor, seq_items: torch.Tensor,
                item_id: torch.Tensor, item_cat: torch.Tensor) -> torch.Tensor:
        mask = (seq_items != 0).unsqueeze(-1).float()                                   # [B, T, 1]
        hist = (self.item_emb(seq_items) * mask).sum(1) / mask.sum(1).clamp(min=1.0)    # [B, D]
        u = self.user_tower(torch.cat([self.user_emb(user_id), hist, user_dense], 1))  # [B, O]
        v = self.item_tower(torch.cat([self.item_emb(item_id), self.cat_emb(item_cat)], 1))  # [B, O]
        return torch.sigmoid((u * v).sum(1, keepdim=True))                             # [B, 1]


def build(batch: int = 4, seq: int = 5, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = {"user_id": torch.randint(0, USERS, (batch,)), "user_dense": torch.randn(batch, 4),
              "seq_items": torch.randint(0, ITEMS, (batch, seq)), "item_id": torch.randint(0, ITEMS, (batch,)),
              "item_cat": torch.randint(0, CATS, (batch,))}
    return TwoTower(**config), inputs, batch_dims(inputs)

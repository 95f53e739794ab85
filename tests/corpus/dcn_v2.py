"""DCN-v2 (deep & cross network v2), deepctr style: full-rank cross layers
``x_{l+1} = x_0 * (W x_l + b) + x_l`` beside a DNN, over user and item embeddings and dense features.

:class:`DCNv2Squeeze` keeps the library's bare ``.squeeze()`` on the stacked embeddings: at batch
1 it drops the batch axis too, and the model fails in eager (mixexport serves 1 user × N
candidates, so a 1 × 1 request must work).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.corpus.common import batch_dims

USERS, ITEMS = 30, 40


class DCNv2(nn.Module):
    def __init__(self, dim: int = 4, dense: int = 3, layers: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(USERS, dim)
        self.item_emb = nn.Embedding(ITEMS, dim)
        width = 2 * dim + 2 * dense
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.dnn = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(width + hidden, 1)

    def embed(self, user_id: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.user_emb(user_id), self.item_emb(item_id)], 1).flatten(1)  # [B, 2K]

    def forward(self, user_id: torch.Tensor, user_dense: torch.Tensor, item_id: torch.Tensor,
                item_dense: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([self.embed(user_id, item_id), user_dense, item_dense], 1)         # [B, W]
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x                                                       # [B, W]
        return torch.sigmoid(self.head(torch.cat([x, self.dnn(x0)], 1)))               # [B, 1]


class DCNv2Squeeze(DCNv2):
    def embed(self, user_id: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        e = torch.stack([self.user_emb(user_id), self.item_emb(item_id)], 1).unsqueeze(2)  # [B, 2, 1, K]
        return e.squeeze().flatten(1)  # bare squeeze: [B, 2K], but [2, K] at batch 1


def _inputs(batch: int) -> dict[str, torch.Tensor]:
    return {"user_id": torch.randint(0, USERS, (batch,)), "user_dense": torch.randn(batch, 3),
            "item_id": torch.randint(0, ITEMS, (batch,)), "item_dense": torch.randn(batch, 3)}


def build(batch: int = 4, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = _inputs(batch)
    return DCNv2(**config), inputs, batch_dims(inputs)


def build_squeeze(batch: int = 4, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = _inputs(batch)
    return DCNv2Squeeze(**config), inputs, batch_dims(inputs)

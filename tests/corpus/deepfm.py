"""DeepFM, deepctr style: every sparse field looked up in one shared table through per-field
offsets (``ids + offsets``), a hashed field (``% rows``), first-order weights, the FM interaction
and a DNN over the concatenated field embeddings.

User and item fields are stacked into one tensor before the lookup, so the user side never has
work of its own: ``split-user-item`` is refused, naming where they meet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.corpus.common import batch_dims

FIELDS = {"user_id": 30, "user_city": 11, "item_id": 40, "item_cat": 5}  # rows per field
CITY_SPACE = 100_000  # raw city ids are hashed into FIELDS["user_city"] rows


class DeepFM(nn.Module):
    def __init__(self, dim: int = 4, hidden: int = 16) -> None:
        super().__init__()
        rows = list(FIELDS.values())
        self.register_buffer("offsets", torch.tensor([0, *rows[:-1]]).cumsum(0))
        self.emb = nn.Embedding(sum(rows), dim)
        self.linear = nn.Embedding(sum(rows), 1)
        self.dnn = nn.Sequential(nn.Linear(len(rows) * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, user_id: torch.Tensor, user_city: torch.Tensor, item_id: torch.Tensor,
                item_cat: torch.Tensor) -> torch.Tensor:
        city = user_city % FIELDS["user_city"]                                          # hashing
        idx = torch.stack([user_id, city, item_id, item_cat], 1) + self.offsets         # [B, F]
        e = self.emb(idx)                                                               # [B, F, K]
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1, keepdim=True)             # [B, 1]
        first = self.linear(idx).sum(1)                                                 # [B, 1]
        return torch.sigmoid(first + fm + self.dnn(e.flatten(1)))                       # [B, 1]


def build(batch: int = 4, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = {"user_id": torch.randint(0, FIELDS["user_id"], (batch,)),
              "user_city": torch.randint(0, CITY_SPACE, (batch,)),
              "item_id": torch.randint(0, FIELDS["item_id"], (batch,)),
              "item_cat": torch.randint(0, FIELDS["item_cat"], (batch,))}
    return DeepFM(**config), inputs, batch_dims(inputs)

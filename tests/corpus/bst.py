"""BST (Behavior Sequence Transformer): the candidate is appended to the behaviour sequence and one
transformer layer attends over both; padding id 0 masks history positions (key padding mask), the
candidate's position is never masked. Profile features join the flattened transformer output.

The candidate sits inside the sequence's self-attention, so neither ``split-user-item`` nor
``extract-kv-cache`` has user-only work to keep: both are refused with the place user and item meet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.corpus.common import batch_dims

USERS, ITEMS = 30, 40
SEQ = 5


class BST(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(USERS, dim)
        self.item_emb = nn.Embedding(ITEMS, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(SEQ + 1, dim) * 0.1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.head = nn.Sequential(nn.Linear((SEQ + 2) * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, user_id: torch.Tensor, seq_items: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([seq_items, item_id.unsqueeze(1)], 1)                        # [B, S+1]
        pad = torch.cat([seq_items == 0, torch.zeros_like(item_id, dtype=torch.bool).unsqueeze(1)], 1)
        x = self.item_emb(tokens) + self.pos                                            # [B, S+1, D]
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, S+1, D/H]
        att = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5                      # [B, H, S+1, S+1]
        att = att.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1)
        h = x + self.proj((att @ v).transpose(1, 2).reshape(b, s, d))                   # [B, S+1, D]
        return torch.sigmoid(self.head(torch.cat([h.flatten(1), self.user_emb(user_id)], 1)))  # [B, 1]


def build(batch: int = 4, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = {"user_id": torch.randint(0, USERS, (batch,)), "seq_items": torch.randint(0, ITEMS, (batch, SEQ)),
              "item_id": torch.randint(1, ITEMS, (batch,))}
    return BST(**config), inputs, batch_dims(inputs)

"""Multi-task models, torch-rechub style: MMoE (shared experts, one softmax gate and tower per task)
returning a tuple ``(ctr, cvr)``, and PLE (task-specific plus shared experts, one extraction
layer) returning a dict ``{"ctr": …, "cvr": …}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.corpus.common import batch_dims

USERS, ITEMS = 30, 40
TASKS = ("ctr", "cvr")


def _mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))


class _Base(nn.Module):
    def __init__(self, dim: int = 4, dense: int = 3) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(USERS, dim)
        self.item_emb = nn.Embedding(ITEMS, dim)
        self.width = 2 * dim + dense

    def features(self, user_id: torch.Tensor, item_id: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.user_emb(user_id), self.item_emb(item_id), item_dense], 1)  # [B, W]


class MMoE(_Base):
    def __init__(self, experts: int = 3, hidden: int = 8, **kw: Any) -> None:
        super().__init__(**kw)
        self.experts = nn.ModuleList(_mlp(self.width, hidden, hidden) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(self.width, experts) for _ in TASKS)
        self.towers = nn.ModuleList(_mlp(hidden, hidden, 1) for _ in TASKS)

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor,
                item_dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(user_id, item_id, item_dense)
        e = torch.stack([f(x) for f in self.experts], 1)                                # [B, E, H]
        outs = []
        for gate, tower in zip(self.gates, self.towers):
            g = torch.softmax(gate(x), -1).unsqueeze(-1)                                # [B, E, 1]
            outs.append(torch.sigmoid(tower((g * e).sum(1))))                           # [B, 1]
        return outs[0], outs[1]


class PLE(_Base):
    def __init__(self, shared: int = 2, specific: int = 1, hidden: int = 8, **kw: Any) -> None:
        super().__init__(**kw)
        self.shared = nn.ModuleList(_mlp(self.width, hidden, hidden) for _ in range(shared))
        self.specific = nn.ModuleList(nn.ModuleList(_mlp(self.width, hidden, hidden) for _ in range(specific))
                                      for _ in TASKS)
        self.gates = nn.ModuleList(nn.Linear(self.width, shared + specific) for _ in TASKS)
        self.towers = nn.ModuleList(_mlp(hidden, hidden, 1) for _ in TASKS)

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor,
                item_dense: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.features(user_id, item_id, item_dense)
        shared = [f(x) for f in self.shared]
        out = {}
        for task, own, gate, tower in zip(TASKS, self.specific, self.gates, self.towers):
            e = torch.stack([f(x) for f in own] + shared, 1)                            # [B, E, H]
            g = torch.softmax(gate(x), -1).unsqueeze(-1)                                # [B, E, 1]
            out[task] = torch.sigmoid(tower((g * e).sum(1)))                            # [B, 1]
        return out


def _inputs(batch: int) -> dict[str, torch.Tensor]:
    return {"user_id": torch.randint(0, USERS, (batch,)), "item_id": torch.randint(0, ITEMS, (batch,)),
            "item_dense": torch.randn(batch, 3)}


def build_mmoe(batch: int = 4, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = _inputs(batch)
    return MMoE(**config), inputs, batch_dims(inputs)


def build_ple(batch: int = 4, **config: Any) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    inputs = _inputs(batch)
    return PLE(**config), inputs, batch_dims(inputs)

"""A small trainer shared by every reference family (``examples/train_movielens.py`` wraps it).

Each family's ``training_loss`` supplies its own terms (task BCE, MoE sparsity penalties,
auxiliary heads); evaluation uses the eval-mode forward, i.e. exactly what is exported.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from mixexport.data import Dataset, Split
from mixexport.verification.metrics import auc, logloss, sigmoid


def predict(model: torch.nn.Module, split: Split, batch_size: int = 8192) -> np.ndarray:
    """Task-0 logits of ``model`` (eval mode) on every row of ``split``."""
    model.eval()
    outs = []
    with torch.inference_mode():
        for lo in range(0, len(split), batch_size):
            feeds = {k: torch.from_numpy(v[lo:lo + batch_size]) for k, v in split.feeds.items()}
            outs.append(model(**feeds)[:, 0].numpy())
    return np.concatenate(outs)


def evaluate(model: torch.nn.Module, split: Split) -> dict[str, float]:
    logits = predict(model, split)
    return {"auc": auc(split.label, logits), "logloss": logloss(split.label, sigmoid(logits))}


def train(model: torch.nn.Module, data: Dataset, *, epochs: int = 2, batch_size: int = 512, lr: float = 2e-3,
          weight_decay: float = 1e-6, seed: int = 0, max_steps: int | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Adam on shuffled training rows; returns test metrics and timings."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    feeds = {k: torch.from_numpy(v) for k, v in data.train.feeds.items()}
    label = torch.from_numpy(data.train.label)
    n = len(data.train)
    steps, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(n))
        total, count = 0.0, 0
        for lo in range(0, n, batch_size):
            idx = order[lo:lo + batch_size]
            loss = model.training_loss({k: v[idx] for k, v in feeds.items()}, label[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        metrics = evaluate(model, data.test)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / max(count, 1):.4f}, test AUC {metrics['auc']:.4f}, "
            f"test logloss {metrics['logloss']:.4f} ({time.perf_counter() - t0:.0f}s)")
        if max_steps is not None and steps >= max_steps:
            break
    model.eval()
    return {"test_auc": metrics["auc"], "test_logloss": metrics["logloss"], "steps": steps,
            "epochs": epoch + 1, "seconds": time.perf_counter() - t0}

"""Building blocks shared by the reference families: feature schema, embeddings, per-token linear,
parameter-free token mixing, and the base class every family's model derives from.

Layout convention: inside the backbone, activations are **token-major** ``[T, B, D]``. A per-token
linear is then one batched MatMul ``[T,B,D] @ [T,D,H]`` with no transposes around it (never Einsum:
ONNX Runtime CPU's Einsum is 1.3-7.7x slower), and token mixing is a single Transpose.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixexport.specs import TensorSpec

INPUT_NAMES = ("user_cat", "item_cat", "item_dense", "seq_items")


@dataclass(frozen=True)
class FeatureSchema:
    """The raw features a model reads, by role.

    ``user_cat [B, len(user_vocab)]`` and ``item_cat [B, len(item_vocab)]`` hold one categorical id
    per column (column j in ``[0, vocab[j])``); ``item_dense [B, item_dense]`` float features;
    ``seq_items [B, seq_len]`` the user's earlier items, most recent last, 0 = padding.
    With ``behaviour_len > 0`` (multi-behaviour models: Pyramid Mixer) also
    ``seq_behaviours [B, behaviour_types, behaviour_len, len(behaviour_vocab)]``: per behaviour type
    the user's most recent behaviours (most recent last), each with one id per feature attribute
    (column j in ``[0, behaviour_vocab[j])``; an item id 0 in column 0 = padding).
    The defaults are a small synthetic schema; the MovieLens loader builds the real one.
    """

    user_vocab: tuple[int, ...] = (50, 8, 3, 22, 10)
    item_vocab: tuple[int, ...] = (100, 12)
    item_dense: int = 19
    seq_len: int = 16
    seq_vocab: int = 100
    behaviour_len: int = 0                                 # 0: no seq_behaviours input
    behaviour_types: int = 3
    behaviour_vocab: tuple[int, ...] = (100, 17, 20, 11)   # item, year bucket, genre, elapsed bucket

    def __post_init__(self) -> None:
        if not self.user_vocab or not self.item_vocab or min(self.user_vocab + self.item_vocab) < 1:
            raise ValueError("schema needs at least one user and one item column, vocab sizes >= 1")
        if self.item_dense < 1 or self.seq_len < 1 or self.seq_vocab < 2:
            raise ValueError("schema needs item_dense >= 1, seq_len >= 1 and seq_vocab >= 2")
        if self.behaviour_len < 0 or self.behaviour_types < 1 or not self.behaviour_vocab \
                or min(self.behaviour_vocab) < 1 or self.behaviour_vocab[0] < 2:
            raise ValueError("schema needs behaviour_len >= 0, behaviour_types >= 1 and behaviour_vocab sizes "
                             ">= 1 (>= 2 for the item column: id 0 pads)")

    def input_specs(self, batch: str = "batch") -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("user_cat", "int64", (batch, len(self.user_vocab)), "user", vocab=self.user_vocab),
            TensorSpec("item_cat", "int64", (batch, len(self.item_vocab)), "item", vocab=self.item_vocab),
            TensorSpec("item_dense", "float32", (batch, self.item_dense), "item"),
            TensorSpec("seq_items", "int64", (batch, self.seq_len), "sequence",
                       vocab=self.seq_vocab),
        ) + ((TensorSpec("seq_behaviours", "int64",
                         (batch, self.behaviour_types, self.behaviour_len, len(self.behaviour_vocab)),
                         "sequence", vocab=self.behaviour_vocab),) if self.behaviour_len > 0 else ())


def random_feeds(schema: FeatureSchema, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random inputs: ids inside each column's vocabulary, some sequence padding."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, schema.seq_vocab, size=(rows, schema.seq_len))
    pad = rng.integers(0, schema.seq_len + 1, size=rows)  # leading padding length per row
    seq[np.arange(schema.seq_len)[None, :] < pad[:, None]] = 0
    feeds = {
        "user_cat": np.stack([rng.integers(0, v, rows) for v in schema.user_vocab], 1),
        "item_cat": np.stack([rng.integers(0, v, rows) for v in schema.item_vocab], 1),
        "item_dense": rng.standard_normal((rows, schema.item_dense)).astype(np.float32),
        "seq_items": seq.astype(np.int64),
    }
    if schema.behaviour_len > 0:
        nb, length = schema.behaviour_types, schema.behaviour_len
        beh = np.stack([rng.integers(1 if j == 0 else 0, v, (rows, nb, length))
                        for j, v in enumerate(schema.behaviour_vocab)], -1)
        pad = rng.integers(0, length + 1, size=(rows, nb))  # leading padding per (row, type)
        beh[np.arange(length)[None, None, :] < pad[:, :, None]] = 0
        feeds["seq_behaviours"] = beh.astype(np.int64)
    return feeds


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a (nested) frozen config dataclass; unknown or mistyped keys raise ValueError.

    Keys missing from ``data`` take the field's default.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a mapping, found {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} for {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            value = config_from_dict(type(default), value)
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"config key {name!r}: expected a list, found {type(value).__name__}")
            value = tuple(value)
        elif isinstance(default, bool) or isinstance(value, bool):
            if not (isinstance(default, bool) and isinstance(value, bool)):
                raise ValueError(f"config key {name!r}: expected {type(default).__name__}, found "
                                 f"{type(value).__name__}")
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        elif not isinstance(value, type(default)):
            raise ValueError(f"config key {name!r}: expected {type(default).__name__}, found "
                             f"{type(value).__name__}")
        kwargs[name] = value
    return cls(**kwargs)


class PerTokenLinear(nn.Module):
    """Token t has its own weight: ``y[t] = x[t] @ W[t] + b[t]``; x ``[T,B,I]`` → ``[T,B,O]``."""

    def __init__(self, tokens: int, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(tokens, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(tokens, 1, d_out).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)  # [T,B,I] @ [T,I,O] -> [T,B,O]
        return y if self.bias is None else y + self.bias


def token_mix(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Parameter-free multi-head token mixing: ``[T,B,D]`` → ``[H,B,T·D/H]``.

    Mixed token h is the concatenation over all T tokens of their h-th head slice.
    With H = T it is its own inverse.
    """
    t, b, d = x.shape
    return x.reshape(t, b, heads, d // heads).permute(2, 1, 0, 3).reshape(heads, b, t * d // heads)


def token_revert(m: torch.Tensor, tokens: int) -> torch.Tensor:
    """Inverse of :func:`token_mix`: ``[H,B,T·D/H]`` → ``[T,B,D]``."""
    h, b, w = m.shape
    return m.reshape(h, b, tokens, w // tokens).permute(2, 1, 0, 3).reshape(tokens, b, h * w // tokens)


def chunk_tokens(e: torch.Tensor, tokens: int, chunk: int) -> torch.Tensor:
    """Semantic tokenization step: ``[B,E]`` → zero-pad to T·chunk → ``[T,B,chunk]``."""
    b = e.shape[0]
    e = F.pad(e, (0, tokens * chunk - e.shape[1]))
    return e.reshape(b, tokens, chunk).transpose(0, 1)


class FeatureEmbedding(nn.Module):
    """Raw features → one embedding per feature, concatenated per role group.

    ``user(user_cat, seq_items)`` → ``[B, (Fu+1)·e]`` (user columns, then the masked mean of the
    sequence's item embeddings); ``item(item_cat, item_dense)`` → ``[B, (Fi+1)·e]`` (item columns,
    then a projection of the dense features). All columns of a role share one table with offsets,
    so each lookup is a single Gather.
    """

    def __init__(self, schema: FeatureSchema, emb_dim: int) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.user_table = nn.Embedding(sum(schema.user_vocab), emb_dim)
        self.item_table = nn.Embedding(sum(schema.item_vocab), emb_dim)
        self.seq_table = nn.Embedding(schema.seq_vocab, emb_dim)
        self.dense = nn.Linear(schema.item_dense, emb_dim)
        for t in (self.user_table, self.item_table, self.seq_table):
            nn.init.normal_(t.weight, std=0.05)
        self.register_buffer("user_offsets", _offsets(schema.user_vocab), persistent=False)
        self.register_buffer("item_offsets", _offsets(schema.item_vocab), persistent=False)
        self.user_width = (len(schema.user_vocab) + 1) * emb_dim
        self.item_width = (len(schema.item_vocab) + 1) * emb_dim

    def sequence(self, seq_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position embeddings ``[B,S,e]`` and the padding mask ``[B,S]`` (1 = real item)."""
        return self.seq_table(seq_items), (seq_items > 0).to(torch.float32)

    def user(self, user_cat: torch.Tensor, seq_items: torch.Tensor) -> torch.Tensor:
        b = user_cat.shape[0]
        cols = self.user_table(user_cat + self.user_offsets).reshape(b, -1)  # [B, Fu·e]
        emb, mask = self.sequence(seq_items)
        pooled = (emb * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return torch.cat([cols, pooled], dim=1)

    def item(self, item_cat: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        b = item_cat.shape[0]
        cols = self.item_table(item_cat + self.item_offsets).reshape(b, -1)  # [B, Fi·e]
        return torch.cat([cols, self.dense(item_dense)], dim=1)


def _offsets(vocab: tuple[int, ...]) -> torch.Tensor:
    # device given: a model built on the meta device (a large checkpoint's) still has its offsets
    return torch.tensor(np.concatenate([[0], np.cumsum(vocab)[:-1]]), dtype=torch.int64, device="cpu")


class Towers(nn.Module):
    """One small MLP per task on the pooled representation: ``[B,D]`` → ``[B,tasks]`` logits."""

    def __init__(self, dim: int, tasks: int) -> None:
        super().__init__()
        hidden = max(dim // 2, 8)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)) for _ in range(tasks))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.cat([tower(pooled) for tower in self.towers], dim=1)


class RankingModel(nn.Module):
    """Base of every reference family: declared input specs/roles, example inputs and loss.

    ``forward(user_cat, item_cat, item_dense, seq_items)`` returns logits ``[B, tasks]``.
    """

    family: ClassVar[str]
    config: Any

    def __init__(self, config: Any) -> None:
        """Every family keeps its config and embeds its ID features the same way."""
        super().__init__()
        self.config = config
        self.embed = FeatureEmbedding(config.schema, config.emb_dim)

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.config.schema.input_specs()

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logit", "float32", ("batch", self.config.tasks), "output"),)

    def example_inputs(self, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
        return random_feeds(self.config.schema, rows, seed)

    def training_loss(self, feeds: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of task 0 against ``label``; families add their own terms."""
        logits = self(**feeds)
        return F.binary_cross_entropy_with_logits(logits[:, 0], label)

"""Real labelled data for training and metric parity: MovieLens-100k, read from the files that ship
inside the ``recbole==1.2.1`` wheel (install it with ``pip install --no-deps recbole==1.2.1``; the
data is never copied into this repository), or a user's own ``.npz``.

MovieLens features (all ids are 0-based vocab indices):
- ``user_cat``: user id, age bucket (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), gender,
  occupation, first digit of the zip code (10 = not a digit);
- ``item_cat``: item id, release-year bucket (5-year bins from 1920, 0 = unknown);
- ``item_dense``: the 19 genres, multi-hot;
- ``seq_items``: the user's earlier items ordered by (timestamp, item_id), most recent last,
  left-padded with 0. Training rows see the items before them; test rows see the user's history
  before the split time (a request is scored at the split time, so all its candidates share it);
- ``seq_behaviours`` (only when ``behaviour_len > 0``, read by Pyramid Mixer): the user's earlier
  ratings split into three behaviour types by rating (disliked 1-2, neutral 3, liked 4-5), the
  ``behaviour_len`` most recent of each type (most recent last, left-padded with 0), each with
  ``BEHAVIOUR_ATTRIBUTES`` feature attributes: item id, release-year bucket, primary genre (1 +
  index of the item's first genre), elapsed-time bucket (1 + min(floor(log2(1 + days before the
  row's time)), 9); test rows count from the split time). Same history rule as ``seq_items``;
- label: rating >= 4.
Split: by time; the last ``test_fraction`` of interactions (by timestamp) form the test split.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixexport.errors import BadInputError, EnvironmentUnavailableError
from mixexport.specs import Request, TensorSpec, group_rows, request_from_rows

MOVIELENS = "movielens-100k"
AGE_BINS = (18, 25, 35, 45, 50, 56)
#: seq_behaviours: behaviour types by rating (disliked 1-2, neutral 3, liked 4-5) and attributes
BEHAVIOUR_TYPES = ("disliked", "neutral", "liked")
BEHAVIOUR_ATTRIBUTES = ("item", "year_bucket", "genre", "elapsed")
ELAPSED_BUCKETS = 10  # 1 + min(floor(log2(1 + days)), 9); 0 pads


@dataclass(frozen=True)
class Split:
    """Flat (user, item) rows: model inputs by name, labels, and the user key of every row."""

    feeds: dict[str, np.ndarray]
    label: np.ndarray
    user_key: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def requests(self, specs: tuple[TensorSpec, ...], users_per_request: int = 1) -> list[Request]:
        """The rows grouped by user into requests of ``users_per_request`` users each."""
        groups = group_rows(self.user_key)
        return [request_from_rows(self.feeds, specs, groups[i:i + users_per_request])
                for i in range(0, len(groups), users_per_request)]


@dataclass(frozen=True)
class Dataset:
    name: str
    schema: Any  # mixexport.models.FeatureSchema (kept untyped: this module must not import torch)
    train: Split
    test: Split
    info: dict[str, Any]


def movielens_available() -> str | None:
    """None when the MovieLens files can be read, else the reason."""
    if importlib.util.find_spec("recbole") is None:
        return "MovieLens-100k comes from the recbole==1.2.1 wheel, which is not installed"
    return None


def _ml_file(name: str) -> str:
    reason = movielens_available()
    if reason:
        raise EnvironmentUnavailableError(reason, "pip install --no-deps recbole==1.2.1")
    res = importlib.resources.files("recbole") / "dataset_example" / "ml-100k" / f"ml-100k.{name}"
    try:
        return res.read_text(encoding="latin-1")
    except FileNotFoundError:
        raise EnvironmentUnavailableError(f"recbole is installed but has no ml-100k.{name}",
                                          "pip install --force-reinstall --no-deps recbole==1.2.1") from None


def _rows(text: str) -> list[list[str]]:
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    next(reader)  # header
    return [r for r in reader if r]


@functools.lru_cache(maxsize=4)
def movielens_100k(seq_len: int = 32, test_fraction: float = 0.2, behaviour_len: int = 0) -> Dataset:
    """Load MovieLens-100k with the features above (cached per process); ``behaviour_len > 0``
    adds ``seq_behaviours``."""
    from mixexport.models import FeatureSchema  # torch-importing; only needed here

    users = _rows(_ml_file("user"))
    items = _rows(_ml_file("item"))
    inter = np.asarray([[int(u), int(i), float(r), int(float(t))] for u, i, r, t in
                        _rows(_ml_file("inter"))], dtype=np.int64)
    occupations = sorted({u[3] for u in users})
    genres = sorted({g for it in items for g in it[3].split()})
    n_user = max(int(u[0]) for u in users) + 1
    n_item = max(int(it[0]) for it in items) + 1

    user_cat = np.zeros((n_user, 5), dtype=np.int64)
    for uid, age, gender, occ, zipc in users:
        u = int(uid)
        user_cat[u] = (u, np.searchsorted(AGE_BINS, int(age), side="right"), int(gender == "F"),
                       occupations.index(occ), int(zipc[0]) if zipc[:1].isdigit() else 10)
    item_cat = np.zeros((n_item, 2), dtype=np.int64)
    item_dense = np.zeros((n_item, len(genres)), dtype=np.float32)
    for iid, _title, year, cls in items:
        i = int(iid)
        y = int(year) if year.strip().isdigit() else 0
        item_cat[i] = (i, 0 if y == 0 else int(np.clip((y - 1920) // 5 + 1, 1, 16)))
        for g in cls.split():
            item_dense[i, genres.index(g)] = 1.0

    # time-ordered global split; ties in time broken by (user, item) for determinism
    order = np.lexsort((inter[:, 1], inter[:, 0], inter[:, 3]))
    inter = inter[order]
    cut_time = inter[int(len(inter) * (1 - test_fraction)), 3]
    is_test = inter[:, 3] >= cut_time

    seq = np.zeros((len(inter), seq_len), dtype=np.int64)
    by_user: dict[int, list[int]] = {}
    for row in np.lexsort((inter[:, 1], inter[:, 3])):  # per user in (timestamp, item_id) order
        by_user.setdefault(int(inter[row, 0]), []).append(int(row))
    for rows in by_user.values():
        history: list[int] = []  # items seen so far, strictly before the split time for test rows
        for row in rows:
            hist = history[-seq_len:]
            if hist:
                seq[row, seq_len - len(hist):] = hist
            if not is_test[row]:
                history.append(int(inter[row, 1]))

    behaviours = None
    if behaviour_len > 0:
        genre = np.where(item_dense.any(1), item_dense.argmax(1) + 1, 0)  # first genre (sorted order) + 1
        behaviours = _behaviours(inter, is_test, int(cut_time), behaviour_len, item_cat[:, 1], genre)

    def split(mask: np.ndarray) -> Split:
        rows = inter[mask]
        feeds = {"user_cat": user_cat[rows[:, 0]], "item_cat": item_cat[rows[:, 1]],
                 "item_dense": item_dense[rows[:, 1]], "seq_items": seq[mask]}
        if behaviours is not None:
            feeds["seq_behaviours"] = behaviours[mask]
        return Split(feeds=feeds, label=(rows[:, 2] >= 4).astype(np.float32), user_key=rows[:, 0].copy())

    extra = {} if behaviour_len <= 0 else {
        "behaviour_len": behaviour_len, "behaviour_types": len(BEHAVIOUR_TYPES),
        "behaviour_vocab": (n_item, 17, len(genres) + 1, ELAPSED_BUCKETS + 1)}
    schema = FeatureSchema(user_vocab=(n_user, len(AGE_BINS) + 1, 2, len(occupations), 11),
                           item_vocab=(n_item, 17), item_dense=len(genres), seq_len=seq_len,
                           seq_vocab=n_item, **extra)
    train, test = split(~is_test), split(is_test)
    info = {"name": MOVIELENS, "source": "recbole==1.2.1 dataset_example/ml-100k",
            "train_rows": len(train), "test_rows": len(test), "test_users": len(np.unique(test.user_key)),
            "split_time": int(cut_time), "positive_rate_test": float(test.label.mean()),
            "seq_len": seq_len, **({"behaviour_len": behaviour_len} if behaviour_len > 0 else {})}
    return Dataset(name=MOVIELENS, schema=schema, train=train, test=test, info=info)


def _behaviours(inter: np.ndarray, is_test: np.ndarray, cut_time: int, length: int, year: np.ndarray,
                genre: np.ndarray) -> np.ndarray:
    """``[rows, types, length, attributes]``: per row, the ``length`` most recent earlier ratings of
    each behaviour type (see the module docstring), under the same history rule as ``seq_items``."""
    out = np.zeros((len(inter), len(BEHAVIOUR_TYPES), length, len(BEHAVIOUR_ATTRIBUTES)), dtype=np.int64)
    kind = np.searchsorted((3, 4), inter[:, 2], side="right")  # rating 1-2 → 0, 3 → 1, 4-5 → 2
    attrs = np.stack([inter[:, 1], year[inter[:, 1]], genre[inter[:, 1]]], 1)
    now = np.where(is_test, cut_time, inter[:, 3])
    order = np.lexsort((inter[:, 1], inter[:, 3], inter[:, 0]))  # by user, then (timestamp, item_id)
    starts = np.flatnonzero(np.r_[True, inter[order[1:], 0] != inter[order[:-1], 0]])
    steps = np.arange(length)
    for rows in np.split(order, starts[1:]):
        for b in range(len(BEHAVIOUR_TYPES)):
            counts = (~is_test[rows] & (kind[rows] == b)).astype(np.int64)
            own = rows[counts.astype(bool)]                  # this type's history rows, in time order
            if not len(own):
                continue
            before = np.cumsum(counts) - counts              # history length at each row (strictly before)
            pos = before[:, None] - length + steps[None, :]  # [rows, length] into `own`, < 0 pads
            ok = pos >= 0
            past = own[np.where(ok, pos, 0)]
            days = np.maximum(now[rows][:, None] - inter[past, 3], 0) // 86400
            elapsed = 1 + np.minimum(np.floor(np.log2(1 + days)).astype(np.int64), ELAPSED_BUCKETS - 1)
            block = np.concatenate([attrs[past], elapsed[..., None]], -1)  # [rows, length, 4]
            out[rows, b] = np.where(ok[..., None], block, 0)
    return out


def load_npz_split(path: str | Path, specs: tuple[TensorSpec, ...]) -> Split:
    """A user's labelled data: an ``.npz`` with one array per model input, ``label`` and
    optionally ``user_key`` (rows of one user share it; default: the rows of identical user-side
    inputs form one user)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise BadInputError(f"--data {path}: not a readable .npz file ({e})",
                            "write it with numpy.savez(path, **inputs, label=labels)") from None
    missing = [s.name for s in specs if s.name not in arrays] + ([] if "label" in arrays else ["label"])
    if missing:
        raise BadInputError(f"--data {path}: missing arrays {missing}; found {sorted(arrays)}",
                            "the .npz needs one array per model input plus 'label'")
    feeds = {s.name: arrays[s.name].astype(s.dtype, copy=False) for s in specs}
    if "user_key" in arrays:
        key = arrays["user_key"]
    else:
        user = [feeds[s.name].reshape(len(arrays["label"]), -1) for s in specs if s.user_side]
        flat = np.concatenate([u.astype(np.float64) for u in user], 1) if user else np.zeros((len(arrays["label"]), 1))
        _, key = np.unique(flat, axis=0, return_inverse=True)
    return Split(feeds=feeds, label=arrays["label"].astype(np.float32), user_key=np.asarray(key).reshape(-1))

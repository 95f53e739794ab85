"""Tensor specs, input roles and the request type shared by every part of mixexport.

A graph input has a *role*: ``user`` (one row per user), ``item`` (one row per candidate) or
``sequence`` (the user's behaviour sequence: a user-side input with a sequence axis). Segment
boundaries add ``state`` (user state crossing from the user to the item segment), ``cache`` (a
per-user K/V cache) and ``index`` (``user_index``). Outputs have role ``output``.

Shapes are tuples whose entries are ints (static) or strings (symbolic: ``batch``, ``users``,
``candidates``, ``seq``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from mixexport.errors import BadInputError

INPUT_ROLES = ("user", "item", "sequence")
ROLE_PREFIXES = {"user_": "user", "item_": "item", "seq_": "sequence"}
USER_SIDE_ROLES = ("user", "sequence")
Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (numpy name), shape with symbolic dims, role, and for ids the vocabulary size."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    role: str
    vocab: int | tuple[int, ...] | None = None  # id range: one bound, or one per last-axis column

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                             "role": self.role}
        if self.vocab is not None:
            d["vocab"] = list(self.vocab) if isinstance(self.vocab, tuple) else self.vocab
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        vocab = d.get("vocab")
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]), role=d["role"],
                   vocab=tuple(vocab) if isinstance(vocab, list) else vocab)

    @property
    def user_side(self) -> bool:
        return self.role in USER_SIDE_ROLES


def role_from_name(name: str) -> str | None:
    """The role implied by a ``user_``/``item_``/``seq_`` name prefix, or None."""
    for prefix, role in ROLE_PREFIXES.items():
        if name.startswith(prefix):
            return role
    return None


@dataclass(frozen=True)
class Request:
    """One serving request: U users and N candidates.

    ``user`` holds the user-side inputs (roles user and sequence) with leading dim U, ``item`` the
    item inputs with leading dim N, and ``user_index [N]`` says which user each candidate belongs
    to. ``user_ids`` optionally names the U users (keys for per-user caches).
    """

    user: dict[str, np.ndarray]
    item: dict[str, np.ndarray]
    user_index: np.ndarray
    user_ids: tuple[Any, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return int(next(iter(self.user.values())).shape[0]) if self.user else 1

    @property
    def num_candidates(self) -> int:
        return int(self.user_index.shape[0])

    def rows(self) -> dict[str, np.ndarray]:
        """The flat (user, item) rows the original model sees: user rows gathered by user_index."""
        feeds = {name: np.ascontiguousarray(arr[self.user_index]) for name, arr in self.user.items()}
        feeds.update(self.item)
        return feeds

    @classmethod
    def single_user(cls, user: dict[str, np.ndarray], item: dict[str, np.ndarray],
                    user_id: Any = None) -> Request:
        n = int(next(iter(item.values())).shape[0])
        return cls(user=user, item=item, user_index=np.zeros(n, dtype=np.int64),
                   user_ids=None if user_id is None else (user_id,))

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        d = {f"user/{k}": v for k, v in self.user.items()}
        d.update({f"item/{k}": v for k, v in self.item.items()})
        d["user_index"] = self.user_index
        return d

    @classmethod
    def from_npz_dict(cls, d: Mapping[str, np.ndarray]) -> Request:
        user = {k[5:]: np.asarray(v) for k, v in d.items() if k.startswith("user/")}
        item = {k[5:]: np.asarray(v) for k, v in d.items() if k.startswith("item/")}
        if "user_index" not in d:
            raise BadInputError("sample inputs have no 'user_index' array",
                                "rebuild the bundle with `mixexport build`")
        return cls(user=user, item=item, user_index=np.asarray(d["user_index"]))


def group_rows(user_key: np.ndarray) -> list[tuple[Any, np.ndarray]]:
    """Group flat rows by ``user_key``: a list of (key, row indices) in first-seen order."""
    order: dict[Any, list[int]] = {}
    for i, k in enumerate(user_key.tolist()):
        order.setdefault(k, []).append(i)
    return [(k, np.asarray(v, dtype=np.int64)) for k, v in order.items()]


def request_from_rows(feeds: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...],
                      groups: list[tuple[Any, np.ndarray]]) -> Request:
    """A request holding the given user groups of flat rows (U = len(groups)).

    The user-side inputs of each group must be identical across its rows (they are one user's).
    """
    user_specs = [s for s in specs if s.user_side]
    item_specs = [s for s in specs if not s.user_side]
    firsts = np.asarray([idx[0] for _, idx in groups], dtype=np.int64)
    all_idx = np.concatenate([idx for _, idx in groups])
    user_index = np.concatenate([np.full(len(idx), u, dtype=np.int64)
                                 for u, (_, idx) in enumerate(groups)])
    for s in user_specs:
        col = feeds[s.name]
        if not np.array_equal(col[all_idx], col[firsts][user_index]):
            raise BadInputError(f"user-side input {s.name!r} differs between rows of one user",
                                "a request needs one value of each user input per user")
    return Request(user={s.name: np.ascontiguousarray(feeds[s.name][firsts]) for s in user_specs},
                   item={s.name: np.ascontiguousarray(feeds[s.name][all_idx]) for s in item_specs},
                   user_index=user_index, user_ids=tuple(k for k, _ in groups),
                   meta={"rows": all_idx})


def check_feeds(specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray],
                dims: Mapping[str, int] | None = None, what: str = "input") -> dict[str, int]:
    """Check names, dtypes, ranks, static and shared symbolic dims, id ranges and NaN/Inf.

    Returns the symbolic dims bound by ``feeds`` (e.g. ``{"batch": 256}``). Raises
    :class:`BadInputError` naming the input and its expected spec.
    """
    bound = dict(dims or {})
    names = {s.name for s in specs}
    missing = sorted(names - set(feeds))
    extra = sorted(set(feeds) - names)
    if missing or extra:
        raise BadInputError(f"{what}s do not match: missing {missing}, unexpected {extra}",
                            f"expected {[describe(s) for s in specs]}")
    for s in specs:
        arr = feeds[s.name]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(s.dtype):
            found = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise BadInputError(f"{what} {s.name!r}: expected dtype {s.dtype}, found {found}",
                                f"expected {describe(s)}")
        if arr.ndim != len(s.shape):
            raise BadInputError(f"{what} {s.name!r}: expected rank {len(s.shape)} {list(s.shape)}, "
                                f"found shape {list(arr.shape)}", f"expected {describe(s)}")
        for axis, (want, got) in enumerate(zip(s.shape, arr.shape)):
            if isinstance(want, str):
                if bound.setdefault(want, got) != got:
                    raise BadInputError(f"{what} {s.name!r}: axis {axis} ({want}) is {got}, but other "
                                        f"inputs have {want} = {bound[want]}", f"expected {describe(s)}")
            elif want != got:
                raise BadInputError(f"{what} {s.name!r}: axis {axis} must be {want}, found {got}",
                                    f"expected {describe(s)}")
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0].tolist()
            raise BadInputError(f"{what} {s.name!r} holds NaN/Inf (first at index {bad})",
                                "clean the features before scoring: NaN/Inf would propagate to the scores")
        if s.vocab is not None and arr.size:
            upper = np.asarray(s.vocab, dtype=np.int64)
            if arr.min() < 0 or (arr >= upper).any():
                where = np.argwhere((arr < 0) | (arr >= upper))[0].tolist()
                raise BadInputError(f"{what} {s.name!r}: id {int(arr[tuple(where)])} at index {where} is "
                                    f"outside its vocabulary (expected 0 <= id < {_bound_at(s.vocab, where)})",
                                    "map unknown ids to a valid id (e.g. 0) before scoring")
    return bound


def random_ids(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random non-padding ids of ``spec`` (1 <= id < its vocabulary, per last-axis column when it has
    one bound per column; id 0 pads, and is the only id of a 1-id vocabulary), in its dtype: e.g.
    new behaviours for a sequence input."""
    upper = np.asarray(spec.vocab if spec.vocab is not None else 2, dtype=np.int64)
    low = (upper > 1).astype(np.int64)
    if not upper.ndim:
        low, upper = int(low), int(upper)
    return rng.integers(low, upper, size=shape).astype(spec.dtype)


def _bound_at(vocab: int | tuple[int, ...], index: list[int]) -> int:
    return vocab if isinstance(vocab, int) else vocab[index[-1]]


def describe(s: TensorSpec) -> str:
    shape = ",".join(str(d) for d in s.shape)
    return f"{s.name}: {s.dtype}[{shape}] ({s.role})"

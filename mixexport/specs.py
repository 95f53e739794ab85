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
class IdRange:
    """The ids one column of an integer input may hold: ``low <= id < high``.

    ``high`` None means no upper bound: the model maps every id into its table itself (``x % rows``
    hashing, a clamp), so any id from ``low`` up is served as eager serves it. ``rows`` is the size
    of the table the column indexes (how wide example ids are drawn for an open range), ``padding``
    the id the model pads with (an embedding's ``padding_idx``), ``via`` how the range was found.
    Ids are never negative: ``low`` is at least 0 even where the model would accept less.
    """

    low: int = 0
    high: int | None = None
    rows: int | None = None
    padding: int | None = None
    via: str = ""

    def allows(self) -> str:
        """The range as a condition, for messages: ``0 <= id < 50`` or ``id >= 0``."""
        return f"{self.low} <= id < {self.high}" if self.high is not None else f"id >= {self.low}"

    def width(self) -> int:
        """How many ids example requests draw from (an open range: three table widths, so hashed or
        clamped ids beyond the table are exercised too)."""
        if self.high is not None:
            return self.high - self.low
        return 3 * max(self.rows or 1, 1)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"low": self.low, "high": self.high}
        extra = (("rows", self.rows), ("padding", self.padding), ("via", self.via))
        d.update({k: v for k, v in extra if v not in (None, "")})
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> IdRange:
        return cls(low=int(d.get("low", 0)), high=None if d.get("high") is None else int(d["high"]),
                   rows=d.get("rows"), padding=d.get("padding"), via=str(d.get("via", "")))


#: one range for every element, or one per last-axis column; None for a column no range was found for
IdRanges = tuple[IdRange | None, ...]


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (numpy name), shape with symbolic dims, role, and for ids their valid ranges."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    role: str
    vocab: int | tuple[int, ...] | None = None  # id range: one bound, or one per last-axis column
    # id ranges found in the graph (mixexport.program.ids); older manifests carry ``vocab`` only,
    # which reads as 0 <= id < vocab (see :meth:`id_ranges`)
    ids: IdRanges | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                             "role": self.role}
        if self.vocab is not None:
            d["vocab"] = list(self.vocab) if isinstance(self.vocab, tuple) else self.vocab
        if self.ids is not None:
            d["ids"] = [None if r is None else r.to_json() for r in self.ids]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        vocab = d.get("vocab")
        ids = d.get("ids")
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]), role=d["role"],
                   vocab=tuple(vocab) if isinstance(vocab, list) else vocab,
                   ids=None if ids is None else tuple(None if r is None else IdRange.from_json(r) for r in ids))

    @property
    def user_side(self) -> bool:
        return self.role in USER_SIDE_ROLES

    def id_ranges(self) -> IdRanges | None:
        """The valid ids: the graph's ranges, else ``vocab`` read as ``0 <= id < vocab`` (id 0 pads),
        else None (not an id input, or nothing could be found)."""
        if self.ids is not None:
            return self.ids
        if self.vocab is None:
            return None
        bounds = self.vocab if isinstance(self.vocab, tuple) else (self.vocab,)
        return tuple(IdRange(0, int(b), rows=int(b), padding=0, via="vocab") for b in bounds)


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
        ranges = s.id_ranges()
        if ranges is not None and arr.size:
            _check_ids(s, arr, ranges, what)
    return bound


def _check_ids(s: TensorSpec, arr: np.ndarray, ranges: IdRanges, what: str) -> None:
    """Refuse ids outside their column's range, naming the column, how many, and the range: an
    ONNX Gather would wrap -1 to the last row, and a hashed or clamped id must still be >= 0."""
    columns = len(ranges)
    if columns > 1 and (arr.ndim < 2 or arr.shape[-1] != columns):
        return  # the shape check above already refused a wrong last axis
    lo = np.asarray([r.low if r is not None else np.iinfo(np.int64).min for r in ranges], dtype=np.int64)
    hi = np.asarray([r.high - 1 if r is not None and r.high is not None else np.iinfo(np.int64).max
                     for r in ranges], dtype=np.int64)
    values = arr.reshape(-1, columns).astype(np.int64, copy=False)
    bad = (values < lo) | (values > hi)
    if not bad.any():
        return
    flat = int(np.flatnonzero(bad.ravel())[0])
    where = [int(i) for i in np.unravel_index(flat, arr.shape)] if arr.ndim else []
    col = flat % columns
    r = ranges[col]
    if r is None:  # an unknown column's bounds are the int64 limits: nothing is outside them
        return
    count, total = (int(bad[:, col].sum()), int(bad.sum())) if columns > 1 else (int(bad.sum()),) * 2
    column = f" column {col}" if columns > 1 else ""
    others = f"; {total - count} more in other columns" if total > count else ""
    raise BadInputError(f"{what} {s.name!r}{column}: {count} id{'s' if count > 1 else ''} outside its vocabulary "
                        f"(expected {r.allows()}), first {int(arr.reshape(-1)[flat])} at index {where}{others}",
                        "map unknown ids into the range (e.g. to the padding id) before scoring: "
                        "ids are never wrapped or clamped")


def random_ids(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator,
               padding: bool = False) -> np.ndarray:
    """Random ids of ``spec`` across its whole range (per last-axis column when it has one range per
    column), in its dtype. ``padding=False``: never the padding id (e.g. new behaviours for a
    sequence input; a 1-id range keeps its one id). ``padding=True``: about one id in eight is the
    padding id (the range's low end where none is declared), so masked positions are checked
    too, but never only them. A column without a range gets id 0 (the caller warns)."""
    ranges = spec.id_ranges() or (None,)
    columns = len(ranges)
    if columns > 1:
        if not shape or shape[-1] != columns:
            raise BadInputError(f"{spec.name!r}: {columns} id ranges for a last axis of {shape[-1:] or 'none'}",
                                "the manifest's ids must have one entry per column")
        return np.stack([_draw(r, shape[:-1], rng, padding) for r in ranges], axis=-1).astype(spec.dtype)
    return _draw(ranges[0], shape, rng, padding).astype(spec.dtype)


def _draw(r: IdRange | None, shape: tuple[int, ...], rng: np.random.Generator, padding: bool) -> np.ndarray:
    if r is None:
        return np.zeros(shape, dtype=np.int64)
    width = max(r.width(), 1)
    pad = r.padding if r.padding is not None and r.low <= r.padding < r.low + width else r.low
    if not padding:
        if width == 1:
            return np.full(shape, r.low, dtype=np.int64)
        ids = rng.integers(r.low, r.low + width - 1, size=shape, dtype=np.int64)
        return ids + (ids >= pad)  # skip the padding id
    ids = rng.integers(r.low, r.low + width, size=shape, dtype=np.int64)
    return np.where(rng.random(shape) < 0.125, pad, ids)


def describe(s: TensorSpec) -> str:
    shape = ",".join(str(d) for d in s.shape)
    return f"{s.name}: {s.dtype}[{shape}] ({s.role})"

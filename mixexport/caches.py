"""The runtime's per-user state, kept across requests: what makes a repeated user cheap.

- :class:`UserStateCache`: a byte-bounded, thread-safe LRU map, the storage of both kinds below.
- :func:`user_state`: the user segment's outputs per user, keyed by user id *and* a digest of that
  user's input rows (:func:`user_key`), so a changed profile or sequence is never served stale.
- :class:`SequenceCache`: a KV bundle's per-user sequence state (the cache segment's K/V): a hit
  when the rows are the cached ones, an *append* (only the new positions computed) when they are
  the cached ones slid by new behaviours and the cache is appendable, else a rebuild.

:class:`mixexport.runtime.Runtime` owns one of each and passes the function that runs a segment.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping

import numpy as np

from mixexport.bundle import SegmentEntry
from mixexport.specs import Request

#: runs one segment on its feeds (the runtime's session call)
Run = Callable[[SegmentEntry, dict[str, np.ndarray]], dict[str, np.ndarray]]

DEFAULT_CACHE_BYTES = 256 * 1024**2


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class UserStateCache:
    """LRU map user id → {state name: one user's row}, bounded by total bytes. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[Hashable, tuple[dict[str, np.ndarray], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: Hashable) -> dict[str, np.ndarray] | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.stats.misses += 1
                return None
            self._data.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def put(self, key: Hashable, value: dict[str, np.ndarray]) -> None:
        size = sum(v.nbytes for v in value.values())
        with self._lock:
            if key in self._data:
                self.stats.bytes -= self._data.pop(key)[1]
            if size > self.max_bytes:
                return
            self._data[key] = (value, size)
            self.stats.bytes += size
            while self.stats.bytes > self.max_bytes:
                _, (_, old) = self._data.popitem(last=False)
                self.stats.bytes -= old
                self.stats.evictions += 1
            self.stats.entries = len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.stats = CacheStats()


def user_key(request: Request, row: int) -> tuple[Any, bytes]:
    """The cache key of user ``row`` of ``request``: its id and a digest of its input rows."""
    return (request.user_ids[row], _digest(request.user, row))  # type: ignore[index]


def user_state(cache: UserStateCache, request: Request, user_seg: SegmentEntry, run: Run,
               extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """User-segment outputs for the request's users, from the cache where possible. ``extra``
    holds other per-user inputs of the segment (sequence caches), leading axis ``users``."""
    extra = extra or {}
    names = [s.name for s in user_seg.inputs]
    axes_in = {s.name: (s.shape.index("users") if "users" in s.shape else 0) for s in user_seg.inputs}
    per_user = {**request.user, **{k: v for k, v in extra.items() if k in axes_in}}
    if request.user_ids is None:
        return run(user_seg, {n: per_user[n] for n in names})
    keys = [user_key(request, i) for i in range(len(request.user_ids))]
    cached = [cache.get(key) for key in keys]
    axes = {s.name: (s.shape.index("users") if "users" in s.shape else 0) for s in user_seg.outputs}
    missing = [i for i, c in enumerate(cached) if c is None]
    if missing:
        rows = np.asarray(missing, dtype=np.int64)
        fresh = run(user_seg, {n: np.take(per_user[n], rows, axis=axes_in[n]) for n in names})
        for j, i in enumerate(missing):
            entry = {k: np.take(v, [j], axis=axes[k]) for k, v in fresh.items()}
            cache.put(keys[i], entry)
            cached[i] = entry
    return {k: np.concatenate([c[k] for c in cached], axis=axes[k])  # type: ignore[index]
            for k in cached[0]}  # type: ignore[union-attr]


class SequenceCache:
    """Per-user sequence state of a KV bundle (the manifest's cache ``spec``), in a byte-bounded LRU;
    ``stats`` counts hits, appends and misses. Thread-safe."""

    def __init__(self, spec: Mapping[str, Any] | None, max_bytes: int = DEFAULT_CACHE_BYTES,
                 minimums: Mapping[str, int] | None = None) -> None:
        self.spec = dict(spec) if spec else None
        self.store = UserStateCache(max_bytes)  # window rows + K/V tensors per user id
        self.stats = {"hits": 0, "appends": 0, "misses": 0}
        self.minimums = dict(minimums or {})  # e.g. groups >= recent: the model reads that many positions
        self._lock = threading.Lock()

    def clear(self) -> None:
        self.store.clear()

    def outputs(self, request: Request, seg: SegmentEntry, run: Run) -> dict[str, np.ndarray]:
        """The cache segment's outputs (e.g. the sequence K/V) for the request's users.

        Per user id the runtime keeps the rows it built the cache from. The same rows again: a hit.
        The same rows slid left by m items with m new ones at the end (m a multiple of the items
        per position) and an appendable cache: only the new positions are computed and the oldest
        dropped. Anything else: rebuilt. Without user ids nothing is kept.
        """
        spec = self.spec or {}
        names = [s.name for s in seg.inputs]
        axes = {s.name: s.shape.index("users") for s in seg.outputs}
        if request.user_ids is None:
            return run(seg, {n: request.user[n] for n in names})
        per_user: list[dict[str, np.ndarray] | None] = []
        misses: list[int] = []
        for u, uid in enumerate(request.user_ids):
            rows = {n: request.user[n][u:u + 1] for n in names}
            entry = self.store.get(("kv", uid))
            got = None
            if entry is not None:
                old_rows = {n: entry["rows/" + n] for n in names}
                if all(np.array_equal(old_rows[n], rows[n]) for n in names):
                    got, kind = {k: v for k, v in entry.items() if not k.startswith("rows/")}, "hits"
                elif spec.get("appendable"):
                    got = self._append(seg, run, spec, entry, old_rows, rows, axes)
                    kind = "appends"
            if got is None:
                misses.append(u)
                per_user.append(None)
                continue
            with self._lock:
                self.stats[kind] += 1
            self.store.put(("kv", uid), {**got, **{"rows/" + n: rows[n] for n in names}})
            per_user.append(got)
        if misses:
            idx = np.asarray(misses, dtype=np.int64)
            fresh = run(seg, {n: request.user[n][idx] for n in names})
            for j, u in enumerate(misses):
                got = {k: np.take(v, [j], axis=axes[k]) for k, v in fresh.items()}
                self.store.put(("kv", request.user_ids[u]),
                            {**got, **{"rows/" + n: request.user[n][u:u + 1] for n in names}})
                per_user[u] = got
            with self._lock:
                self.stats["misses"] += len(misses)
        return {k: np.concatenate([p[k] for p in per_user], axis=axes[k])  # type: ignore[index]
                for k in axes}

    def _append(self, seg: SegmentEntry, run: Run, spec: Mapping[str, Any], entry: Mapping[str, np.ndarray],
                old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                axes: Mapping[str, int]) -> dict[str, np.ndarray] | None:
        seq_name, k = spec["input"], int(spec["items_per_position"])
        along = {seq_name, *spec.get("along", ())}  # the sequence's looked-up rows slide with its ids
        if any(not np.array_equal(old[n], new[n]) for n in old if n not in along):
            return None
        old_seq, new_seq = old[seq_name][0], new[seq_name][0]
        s_old, s_new = len(old_seq), len(new_seq)
        # window tensors (a fixed number of the most recent positions) are recomputed whole from the
        # newest behaviours: the fresh run then covers at least the window (and the segment's minimum)
        windows = {t for t, v in (spec.get("layout") or {}).items() if v.get("positions") == "window"}
        need = max([2] + [int(spec["layout"][t]["window"]) for t in windows]) * k if windows else 0
        need = max(need, int(self.minimums.get("seq", 0))) if windows else 0
        for m in range(k, s_new, k):  # smallest number of appended items that explains the change (some kept)
            keep = s_new - m
            if keep <= s_old and (s_old - keep) % k == 0 and np.array_equal(new_seq[:keep], old_seq[s_old - keep:]):
                # one new position is computed beside the last kept one (a torch.export program takes
                # no size-1 axis; positions are independent, so the extra one is dropped again)
                ctx = k if m == k else 0
                if m + ctx < need:
                    ctx = -(-(need - m) // k) * k
                if ctx > keep:
                    return None  # the window reaches back past what is kept: a rebuild
                fresh = run(seg, {n: (new[n][:, keep - ctx:] if n in along else new[n]) for n in new})
                drop = (s_old - keep) // k
                seq_axes = spec["seq_axis"]
                return {t: fresh[t] if t in windows else
                        np.concatenate([np.take(entry[t], np.arange(drop, entry[t].shape[seq_axes[t]]),
                                                axis=seq_axes[t]),
                                        np.take(fresh[t], np.arange(ctx // k, fresh[t].shape[seq_axes[t]]),
                                                axis=seq_axes[t])], axis=seq_axes[t]) for t in axes}
        return None


def _digest(user: Mapping[str, np.ndarray], row: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(user):
        h.update(name.encode())
        h.update(np.ascontiguousarray(user[name][row]).tobytes())
    return h.digest()

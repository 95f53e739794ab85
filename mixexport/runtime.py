"""Run a bundle for requests: what verify, bench and a Python server use.

A request is U users × N candidates (:class:`~mixexport.specs.Request`). The runtime checks the
request against the manifest's input specs (names, dtypes, shapes, id ranges, NaN/Inf), then
runs the bundle's segment DAG:

- a ``full`` segment sees flat rows: the user inputs gathered by ``user_index`` plus the items;
- a ``user`` segment runs once per (uncached) user and yields user state; an ``item`` segment
  takes that state (leading dim U), the item inputs and ``user_index`` and broadcasts inside.

User state is kept in a bounded, thread-safe LRU cache keyed by user id (``request.user_ids``)
*and* a digest of that user's input rows, so a changed profile or sequence is never served stale.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np

from mixexport.backends.base import Session
from mixexport.bundle import Manifest, SegmentEntry, read_manifest
from mixexport.checked_load import open_sessions, read_segments
from mixexport.errors import BadInputError, IntegrityError
from mixexport.source import Source
from mixexport.specs import Request, TensorSpec, check_feeds

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


class Runtime:
    """Runs a bundle's segments (or the eager reference) for requests."""

    def __init__(self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 segments: tuple[SegmentEntry, ...], sessions: Mapping[str, Session],
                 cache_bytes: int = DEFAULT_CACHE_BYTES, name: str = "bundle",
                 caches: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
                 multiples: Mapping[str, Any] | None = None, minimums: Mapping[str, int] | None = None,
                 tables: Any = None) -> None:
        self.inputs = inputs
        self.tables = tables  # externalized embedding tables (mixexport.tables): ids → rows inputs
        self.outputs = outputs
        self.segments = segments
        self.sessions = dict(sessions)
        self.name = name
        self.cache = UserStateCache(cache_bytes)
        self.kv = UserStateCache(cache_bytes)  # per-user sequence caches: window rows + K/V tensors
        self.kv_spec = dict(caches[0]) if caches else None
        self.kv_stats = {"hits": 0, "appends": 0, "misses": 0}
        self._kv_lock = threading.Lock()
        self.multiples = {k: tuple(v) for k, v in (multiples or {}).items()}
        self.minimums = dict(minimums or {})  # e.g. groups >= recent: the model reads that many positions
        self.trace: dict[str, dict[str, np.ndarray]] | None = None  # set to record each segment's feeds
        self._user_specs = tuple(s for s in inputs if s.user_side)
        self._item_specs = tuple(s for s in inputs if not s.user_side)
        roles = {s.role for s in segments}
        if roles not in ({"full"}, {"user", "item"}, {"cache", "item"}, {"cache", "user", "item"}):
            raise BadInputError(f"unsupported segment layout {sorted(roles)}",
                                "a bundle has one full segment, or user/cache segments and an item segment")
        self.closed = False
        self._stack = ExitStack()
        for session in self.sessions.values():
            self._stack.enter_context(session)  # type: ignore[arg-type]

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def open(cls, bundle: str | Path | Manifest, backend: str | None = None, device: str = "cpu",
             cache_bytes: int = DEFAULT_CACHE_BYTES, verify_files: bool = True,
             manifest_sha256: str | None = None) -> Runtime:
        """Load every segment of a bundle directory with ``backend`` (default: the manifest's).

        Before any session is created, every file a backend is about to load (ONNX files and their
        external data, AOTI packages, TensorRT plans) is read once and checked against its sha256 in
        the manifest, and a missing, unlisted or changed one is refused with an :class:`IntegrityError`
        naming it; the sessions are then created from exactly those bytes, never from the paths
        (:mod:`mixexport.checked_load`). ``verify_files=False`` skips the hashing, for callers that
        checked the files already (e.g. after ``check_integrity``; a file swapped since is then
        loaded); the path rule (nothing outside the bundle) always applies.
        ``manifest_sha256`` pins the manifest itself: the file checks only mean something for a
        manifest you trust. Cost: ``benchmarks/open_cost.py`` (docs/security.md gives the numbers:
        reading and hashing the bytes once and handing them over costs more than hashing the paths
        and letting ONNX Runtime reopen them).
        """
        from mixexport.backends import get_backend

        manifest = bundle if isinstance(bundle, Manifest) else read_manifest(bundle, sha256=manifest_sha256)
        if manifest_sha256 is not None and manifest.sha256 != manifest_sha256.strip().lower():
            raise IntegrityError(f"{manifest.root / 'manifest.json'} has sha256 {manifest.sha256}, not the pinned "
                                 f"{manifest_sha256.strip()[:64]}", "fetch the bundle again")
        backends = {seg.name: get_backend(backend or seg.backend, device) for seg in manifest.segments}
        # every file read once and checked before the first session, which gets those bytes
        checked = read_segments(manifest, backends, hashes=verify_files)
        from mixexport.tables.stores.local import open_tables

        tables = open_tables(manifest, verify_files)  # part files checked like the segments' files
        sessions = open_sessions(manifest, backends, checked)
        return cls(manifest.inputs, manifest.outputs, manifest.segments, sessions, cache_bytes,
                   name=backend or manifest.segments[0].backend, caches=manifest.data.get("caches", []),
                   multiples=manifest.data["model"].get("multiples"), minimums=manifest.data["model"].get("minimums"),
                   tables=tables)

    @classmethod
    def reference(cls, source: Source) -> Runtime:
        """The eager reference as a runtime: the original model on repeated user rows."""
        from mixexport.backends.eager import EagerBackend

        seg = SegmentEntry(name="reference", role="full", file="", backend="eager",
                           inputs=source.inputs, outputs=source.outputs)
        return cls(source.inputs, source.outputs, (seg,),
                   {"reference": EagerBackend().prepare_reference(source)}, name="eager",
                   multiples=source.multiples, minimums=source.minimums)

    def close(self) -> None:
        """Close every segment's session — each releases what it holds (ONNX Runtime sessions,
        TensorRT contexts and engines, AOTI packages) — and drop the per-user caches. Idempotent;
        scoring afterwards raises :class:`RuntimeError`."""
        self._stack.close()
        self.sessions.clear()
        self.cache.clear()
        self.kv.clear()
        if self.tables is not None:
            self.tables.close()
        self.closed = True

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scoring --------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise :class:`BadInputError` naming the first input that does not match its spec."""
        bound = check_feeds(self._user_specs, request.user, what="user input")
        users = bound.get("batch")
        for name, (base, k) in self.multiples.items():
            if name in bound and bound[name] % k:
                raise BadInputError(f"the {name} axis is {bound[name]}, expected a multiple of {k} ({k} items "
                                    f"per {base[:-1] if base.endswith('s') else base})",
                                    f"pad the sequence on the left with id 0 to a multiple of {k}")
        derived = {base: (name, k) for name, (base, k) in self.multiples.items()}  # groups -> (seq, K)
        for dim, lo in self.minimums.items():
            name, k = derived.get(dim, (dim, 1))
            if name in bound and bound[name] < lo * k:
                raise BadInputError(f"the {name} axis is {bound[name]}, expected at least {lo * k}"
                                    + (f" ({lo} {dim} of {k} items)" if k > 1 else ""),
                                    "pad the sequence on the left with id 0")
        candidates = check_feeds(self._item_specs, request.item, what="item input").get("batch")
        idx = request.user_index
        if not isinstance(idx, np.ndarray) or idx.dtype != np.int64 or idx.ndim != 1:
            raise BadInputError("user_index must be an int64 vector [N]",
                                f"found {getattr(idx, 'dtype', type(idx).__name__)} {getattr(idx, 'shape', '')}")
        if candidates is not None and idx.shape[0] != candidates:
            raise BadInputError(f"user_index has {idx.shape[0]} entries, the item inputs have {candidates} rows",
                                "one user_index entry per candidate")
        if users is not None and idx.size and (idx.min() < 0 or idx.max() >= users):
            raise BadInputError(f"user_index values must be in [0, {users}), found {idx.min()}..{idx.max()}",
                                "user_index[i] is the row of the user inputs candidate i belongs to")
        if request.user_ids is not None and users is not None and len(request.user_ids) != users:
            raise BadInputError(f"user_ids has {len(request.user_ids)} entries for {users} users",
                                "one id per user row, or none")

    def score(self, request: Request, validate: bool = True) -> dict[str, np.ndarray]:
        """Outputs by name, one row per candidate."""
        if validate:
            self.check(request)
        if self.tables is not None:  # the store adds the looked-up rows; nothing is scored if an id is unknown
            request = self.tables.expand(request)
        if self.segments[0].role == "full":
            rows = request.rows()
            return self._run(self.segments[0], {s.name: rows[s.name] for s in self.segments[0].inputs})
        return self._score_split(request)

    def _run(self, seg: SegmentEntry, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closed:
            raise RuntimeError(f"the {self.name} runtime is closed")
        if self.trace is not None:
            self.trace[seg.name] = feeds
        return self.sessions[seg.name].run(feeds)

    def _segment(self, role: str) -> SegmentEntry | None:
        return next((s for s in self.segments if s.role == role), None)

    def _score_split(self, request: Request) -> dict[str, np.ndarray]:
        cache_seg, user_seg, item_seg = self._segment("cache"), self._segment("user"), self._segment("item")
        values: dict[str, np.ndarray] = dict(request.item)
        if cache_seg is not None:
            values.update(self.sequence_cache(request, cache_seg))
        if user_seg is not None:
            values.update(self.user_state(request, user_seg, values))
        values["user_index"] = request.user_index
        return self._run(item_seg, {s.name: values[s.name] for s in item_seg.inputs})

    def user_state(self, request: Request, user_seg: SegmentEntry,
                   extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """User-segment outputs for the request's users, from the cache where possible. ``extra``
        holds other per-user inputs of the segment (sequence caches), leading axis ``users``."""
        extra = extra or {}
        names = [s.name for s in user_seg.inputs]
        axes_in = {s.name: (s.shape.index("users") if "users" in s.shape else 0) for s in user_seg.inputs}
        per_user = {**request.user, **{k: v for k, v in extra.items() if k in axes_in}}
        if request.user_ids is None:
            return self._run(user_seg, {n: per_user[n] for n in names})
        keys = [(uid, _digest(request.user, i)) for i, uid in enumerate(request.user_ids)]
        cached = [self.cache.get(key) for key in keys]
        axes = {s.name: (s.shape.index("users") if "users" in s.shape else 0) for s in user_seg.outputs}
        missing = [i for i, c in enumerate(cached) if c is None]
        if missing:
            rows = np.asarray(missing, dtype=np.int64)
            fresh = self._run(user_seg, {n: np.take(per_user[n], rows, axis=axes_in[n]) for n in names})
            for j, i in enumerate(missing):
                entry = {k: np.take(v, [j], axis=axes[k]) for k, v in fresh.items()}
                self.cache.put(keys[i], entry)
                cached[i] = entry
        return {k: np.concatenate([c[k] for c in cached], axis=axes[k])  # type: ignore[index]
                for k in cached[0]}  # type: ignore[union-attr]


    def sequence_cache(self, request: Request, seg: SegmentEntry) -> dict[str, np.ndarray]:
        """The cache segment's outputs (e.g. the sequence K/V) for the request's users.

        Per user id the runtime keeps the rows it built the cache from. The same rows again: a hit.
        The same rows slid left by m items with m new ones at the end (m a multiple of the items
        per position) and an appendable cache: only the new positions are computed and the oldest
        dropped. Anything else: rebuilt. Without user ids nothing is kept.
        """
        spec = self.kv_spec or {}
        names = [s.name for s in seg.inputs]
        axes = {s.name: s.shape.index("users") for s in seg.outputs}
        if request.user_ids is None:
            return self._run(seg, {n: request.user[n] for n in names})
        per_user: list[dict[str, np.ndarray] | None] = []
        misses: list[int] = []
        for u, uid in enumerate(request.user_ids):
            rows = {n: request.user[n][u:u + 1] for n in names}
            entry = self.kv.get(("kv", uid))
            got = None
            if entry is not None:
                old_rows = {n: entry["rows/" + n] for n in names}
                if all(np.array_equal(old_rows[n], rows[n]) for n in names):
                    got, kind = {k: v for k, v in entry.items() if not k.startswith("rows/")}, "hits"
                elif spec.get("appendable"):
                    got = self._append(seg, spec, entry, old_rows, rows, axes)
                    kind = "appends"
            if got is None:
                misses.append(u)
                per_user.append(None)
                continue
            with self._kv_lock:
                self.kv_stats[kind] += 1
            self.kv.put(("kv", uid), {**got, **{"rows/" + n: rows[n] for n in names}})
            per_user.append(got)
        if misses:
            idx = np.asarray(misses, dtype=np.int64)
            fresh = self._run(seg, {n: request.user[n][idx] for n in names})
            for j, u in enumerate(misses):
                got = {k: np.take(v, [j], axis=axes[k]) for k, v in fresh.items()}
                self.kv.put(("kv", request.user_ids[u]),
                            {**got, **{"rows/" + n: request.user[n][u:u + 1] for n in names}})
                per_user[u] = got
            with self._kv_lock:
                self.kv_stats["misses"] += len(misses)
        return {k: np.concatenate([p[k] for p in per_user], axis=axes[k])  # type: ignore[index]
                for k in axes}

    def _append(self, seg: SegmentEntry, spec: Mapping[str, Any], entry: Mapping[str, np.ndarray],
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
                fresh = self._run(seg, {n: (new[n][:, keep - ctx:] if n in along else new[n]) for n in new})
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

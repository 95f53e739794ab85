"""Run a bundle for requests: what verify, bench and a Python server use.

A request is U users × N candidates (:class:`~mixexport.specs.Request`). The runtime checks the
request against the manifest's input specs (names, dtypes, shapes, id ranges, NaN/Inf), then
runs the bundle's segment DAG:

- a ``full`` segment sees flat rows: the user inputs gathered by ``user_index`` plus the items;
- a ``user`` segment runs once per (uncached) user and yields user state; an ``item`` segment
  takes that state (leading dim U), the item inputs and ``user_index`` and broadcasts inside.

User state and sequence (KV) state are kept per user across requests (:mod:`mixexport.caches`).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from mixexport.backends.base import Session
from mixexport.bundle import Manifest, SegmentEntry, read_manifest
from mixexport.caches import DEFAULT_CACHE_BYTES, SequenceCache, UserStateCache, user_state
from mixexport.checked_load import open_sessions, read_segments
from mixexport.errors import BadInputError, IntegrityError
from mixexport.program.shapes import check_maximums
from mixexport.specs import Request, TensorSpec, check_feeds

if TYPE_CHECKING:  # torch (the eager reference) is imported only when a reference is asked for
    from mixexport.source import Source

class Runtime:
    """Runs a bundle's segments (or the eager reference) for requests."""

    def __init__(self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 segments: tuple[SegmentEntry, ...], sessions: Mapping[str, Session],
                 cache_bytes: int = DEFAULT_CACHE_BYTES, name: str = "bundle",
                 caches: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
                 multiples: Mapping[str, Any] | None = None, minimums: Mapping[str, int] | None = None,
                 tables: Any = None, maximums: Mapping[str, int] | None = None) -> None:
        self.inputs = inputs
        self.tables = tables  # externalized embedding tables (mixexport.tables): ids → rows inputs
        self.outputs = outputs
        self.segments = segments
        self.sessions = dict(sessions)
        self.name = name
        self.multiples = {k: tuple(v) for k, v in (multiples or {}).items()}
        self.minimums = dict(minimums or {})  # e.g. groups >= recent: the model reads that many positions
        self.maximums = dict(maximums or {})  # a .pt2's Dim("seq", max=200): the program runs up to there
        self.cache = UserStateCache(cache_bytes)  # user-segment outputs per user (mixexport.caches)
        self.sequences = SequenceCache(caches[0] if caches else None, cache_bytes, self.minimums)
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
             manifest_sha256: str | None = None, tables: str | None = None) -> Runtime:
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
        ``tables`` picks the table store of a bundle with externalized tables: ``None``/``"local"``
        (its part files) or ``redis://HOST:PORT[,…]`` (Redis Cluster, docs/tables.md).
        """
        from mixexport.backends import get_backend

        manifest = bundle if isinstance(bundle, Manifest) else read_manifest(bundle, sha256=manifest_sha256)
        if manifest_sha256 is not None and manifest.sha256 != manifest_sha256.strip().lower():
            raise IntegrityError(f"{manifest.root / 'manifest.json'} has sha256 {manifest.sha256}, not the pinned "
                                 f"{manifest_sha256.strip()[:64]}", "fetch the bundle again")
        backends = {seg.name: get_backend(backend or seg.backend, device) for seg in manifest.segments}
        # every file read once and checked before the first session, which gets those bytes
        checked = read_segments(manifest, backends, hashes=verify_files)
        from mixexport.tables.open import open_store

        store = open_store(manifest, tables, verify_files)  # local part files checked like the segments' files
        try:
            sessions = open_sessions(manifest, backends, checked)
        except BaseException:
            if store is not None:
                store.close()
            raise
        return cls(manifest.inputs, manifest.outputs, manifest.segments, sessions, cache_bytes,
                   name=backend or manifest.segments[0].backend, caches=manifest.data.get("caches", []),
                   multiples=manifest.data["model"].get("multiples"), minimums=manifest.data["model"].get("minimums"),
                   tables=store, maximums=manifest.data["model"].get("maximums"))

    @classmethod
    def reference(cls, source: Source) -> Runtime:
        """The eager reference as a runtime: the original model on repeated user rows."""
        from mixexport.backends.eager import EagerBackend

        seg = SegmentEntry(name="reference", role="full", file="", backend="eager",
                           inputs=source.inputs, outputs=source.outputs)
        return cls(source.inputs, source.outputs, (seg,),
                   {"reference": EagerBackend().prepare_reference(source)}, name="eager",
                   multiples=source.multiples, minimums=source.minimums, maximums=source.maximums)

    def close(self) -> None:
        """Close every segment's session — each releases what it holds (ONNX Runtime sessions,
        TensorRT contexts and engines, AOTI packages) — and drop the per-user caches. Idempotent;
        scoring afterwards raises :class:`RuntimeError`."""
        self._stack.close()
        self.sessions.clear()
        self.cache.clear()
        self.sequences.clear()
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
        item_bound = check_feeds(self._item_specs, request.item, what="item input")
        candidates = item_bound.get("batch")
        check_maximums({**bound, **item_bound}, self.maximums)
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
        """User-segment outputs for the request's users, from the per-user cache where possible
        (:func:`mixexport.caches.user_state`)."""
        return user_state(self.cache, request, user_seg, self._run, extra)

    def sequence_cache(self, request: Request, seg: SegmentEntry) -> dict[str, np.ndarray]:
        """The cache segment's outputs (e.g. the sequence K/V) for the request's users: a hit, an
        append or a rebuild per user (:class:`mixexport.caches.SequenceCache`)."""
        return self.sequences.outputs(request, seg, self._run)

    @property
    def kv_stats(self) -> dict[str, int]:
        """Sequence-cache hits, appends and misses so far."""
        return self.sequences.stats

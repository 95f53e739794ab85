"""Scores one batch of Parquet rows: what every engine runs, in-process (local) or in an actor (ray).

A worker opens the bundle and the reference once. For a batch of one file's rows it groups the rows
into requests (a request = a maximal run of consecutive rows of one user, see
:mod:`mixexport.scale.schema`), scores them in one :class:`~mixexport.runtime.Runtime` request with
``user_index`` (a split bundle runs its user segment once per user of the batch), and returns a
*partial*: the batch's sparse, mergeable contribution to every metric. The first and last runs of a
batch may continue in a neighbouring batch, so they travel as fragments that the engine stitches by
(file, user key); every other run's Kendall tau is final.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixexport.errors import BadInputError, MixexportError
from mixexport.scale.schema import Columns, column_array, label_array, reference_array
from mixexport.specs import Request, TensorSpec
from mixexport.verification.metrics import kendall_tau
from mixexport.verification.streaming import RefinedCounts, ScoreStats, TauStats, TensorStats

#: Every model call sees exactly this many rows (and a split bundle's user segment exactly
#: USERS_PER_CALL users), padded with copies: ONNX Runtime and torch pick kernels by the shapes they
#: are given, so a row's score would otherwise depend on how many rows shared its batch, and the
#: report on the partitioning. With fixed shapes every row runs the same kernels.
ROWS_PER_CALL = 2048
USERS_PER_CALL = 128


@dataclass(frozen=True)
class Job:
    """What a worker needs, picklable: it is shipped to Ray actors."""

    bundle: str
    columns: Columns
    mode: str  # "verify" or "score"
    reference: str | None = None  # checkpoint or .pt2 (verify without --reference-column)
    threads: int | None = None  # intra-op threads of ONNX Runtime and torch in this worker
    tolerances: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # output -> (rtol, atol)
    refine: dict[str, np.ndarray] | None = None  # second pass: the bins counted at full resolution
    tables: str | None = None  # the table store of a bundle with externalized tables (Runtime.open's)


def open_runtime(manifest: Any, threads: int | None, tables: str | None = None) -> Any:
    """The bundle's runtime; with ``threads``, ONNX Runtime segments use that many intra-op threads
    (one per Ray actor: the actors, not ORT's pool, spread the work over the cores)."""
    from mixexport.backends.onnxruntime import OnnxRuntimeBackend
    from mixexport.runtime import Runtime

    if threads:
        segs = tuple(dataclasses.replace(s, session_options={**(s.session_options or OnnxRuntimeBackend().session_options()),
                                                              "intra_op_num_threads": threads})
                     if s.backend == "onnxruntime" else s for s in manifest.segments)
        manifest = dataclasses.replace(manifest, segments=segs)
    return Runtime.open(manifest, verify_files=False, tables=tables)  # the driver checked every file's sha256


class Worker:
    """Opens the bundle (and the eager reference) once; :meth:`process` scores batches."""

    def __init__(self, job: Job) -> None:
        from mixexport.bundle import read_manifest

        self.job = job
        manifest = read_manifest(job.bundle)
        needs_torch = (job.mode == "verify" and job.columns.reference is None) or \
            any(s.backend != "onnxruntime" for s in manifest.segments)
        if job.threads and needs_torch:  # an ONNX bundle scored without the eager model never imports torch (~3 s)
            import torch

            torch.set_num_threads(job.threads)
        self.specs: tuple[TensorSpec, ...] = manifest.inputs
        self.first = manifest.outputs[0].name
        self.outputs = [s.name for s in manifest.outputs]
        self.runtime = open_runtime(manifest, job.threads, job.tables)
        # users per call matter only where a user (or cache) segment runs once per user: a bundle of
        # one full segment gathers user rows per candidate, so its calls are bounded by rows alone
        # (at ~16 candidates per user, a 128-user bound cut calls short and padding wasted ~20 %)
        self.users_per_call = USERS_PER_CALL if any(s.role in ("user", "cache") for s in manifest.segments) \
            else ROWS_PER_CALL
        self.reference = None
        if job.mode == "verify" and job.columns.reference is None:
            from mixexport.verification.run import load_reference

            self.reference = load_reference(manifest, job.reference)

    def close(self) -> None:
        self.runtime.close()

    def eager(self, feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """The eager model on flat rows, in calls of exactly :data:`ROWS_PER_CALL` rows."""
        pad = -rows % ROWS_PER_CALL
        if pad:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in feeds.items()}
        out = self.reference.reference(feeds, chunk=ROWS_PER_CALL)  # type: ignore[union-attr]
        return {k: v[:rows] for k, v in out.items()}

    def bundle(self, path: str, feeds: dict[str, np.ndarray], starts: np.ndarray, rows: int) -> dict[str, np.ndarray]:
        """The bundle on the batch, in requests of exactly :data:`ROWS_PER_CALL` candidates and
        ``users_per_call`` users (a user's consecutive rows share one request where they fit: a
        split bundle runs its user segment once per user per request)."""
        parts: list[dict[str, np.ndarray]] = []
        lo = 0
        while lo < rows:
            first = int(np.searchsorted(starts, lo, side="right")) - 1
            hi = min(lo + ROWS_PER_CALL, rows,
                     int(starts[first + self.users_per_call]) if first + self.users_per_call < len(starts) else rows)
            inner = starts[(starts > lo) & (starts < hi)] - lo
            local = np.concatenate([[0], inner]).astype(np.int64)
            request = _request({k: v[lo:hi] for k, v in feeds.items()}, self.specs, local, hi - lo)
            try:
                got = self.runtime.score(_padded(request, self.users_per_call))
            except BadInputError as e:  # the runtime names the input (= the column); say which file
                raise BadInputError(f"{path}: {e.message}", e.hint) from None
            parts.append({k: v[:hi - lo] for k, v in got.items()})
            lo = hi
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # -- one batch ---------------------------------------------------------------------------
    def process(self, path: str, table: Any) -> dict[str, Any]:
        """The partial of one file's batch (and, when scoring, the output rows)."""
        rows = table.num_rows
        feeds = {s.name: column_array(path, s, table.column(s.name), rows) for s in self.specs}
        cols = self.job.columns
        label = label_array(path, cols.label, table.column(cols.label)) if cols.label else None
        starts, run_keys = self._runs(path, table, feeds, rows)
        got = self.bundle(path, feeds, starts, rows)
        part: dict[str, Any] = {"rows": rows}
        if self.job.mode == "score":
            part["table"] = self._score_table(table, label, got, rows)
            return part
        cand = got[self.first].reshape(rows, -1)[:, 0].astype(np.float32)
        if cols.reference:
            ref = reference_array(path, cols.reference, table.column(cols.reference))
            want = {f"{self.first}[:, 0]": (cand, ref)}
        else:
            expected = self.eager(feeds, rows)
            ref = expected[self.first].reshape(rows, -1)[:, 0].astype(np.float32)
            want = {k: (got[k], expected[k]) for k in self.outputs}
        if self.job.refine is not None:  # second pass: only the refined AUC counts
            if label is not None:
                part["refined"] = {name: RefinedCounts.partial(label, s, self.job.refine[name])
                                   for name, s in (("eager", ref), ("bundle", cand))}
            return part
        tol = self.job.tolerances
        part["tensor"] = {k: TensorStats.partial(a, e, *tol.get(k, tol.get("*", (1e-5, 1e-5))))
                          for k, (a, e) in want.items()}
        if label is not None:
            part["positives"] = int(label.sum())
            part["scores"] = {"eager": ScoreStats.partial(label, ref), "bundle": ScoreStats.partial(label, cand)}
        part["tau"], part["fragments"] = _taus(path, starts, run_keys, rows, ref, cand)
        return part

    def _score_table(self, table: Any, label: np.ndarray | None, got: dict[str, np.ndarray], rows: int) -> Any:
        """The key column, the label and one column per output (a fixed-size list when an output has
        several values per row)."""
        import pyarrow as pa

        cols: dict[str, Any] = {}
        if self.job.columns.key:
            cols[self.job.columns.key] = table.column(self.job.columns.key)
        if label is not None:
            cols[self.job.columns.label] = pa.array(label)  # type: ignore[index]
        for k in self.outputs:
            v = np.ascontiguousarray(got[k].reshape(rows, -1))
            cols[k] = pa.array(v[:, 0]) if v.shape[1] == 1 else pa.FixedSizeListArray.from_arrays(
                pa.array(v.reshape(-1)), v.shape[1])
        return pa.table(cols)

    def _runs(self, path: str, table: Any, feeds: dict[str, np.ndarray], rows: int) -> tuple[np.ndarray, list[Any]]:
        """Start row of every run of one user's consecutive rows, and each run's key."""
        key_col = self.job.columns.key
        if key_col:
            col = table.column(key_col)
            if col.null_count:
                raise BadInputError(f"{path}: key column {key_col!r} has {col.null_count} null values",
                                    "give every row its user's id")
            values = np.asarray(col.to_numpy(zero_copy_only=False))
            change = values[1:] != values[:-1]
        else:  # a change in any user-side input starts a new user
            user = [feeds[s.name].reshape(rows, -1) for s in self.specs if s.user_side]
            if not user:
                values = np.zeros(rows, np.int64)
                change = np.zeros(max(rows - 1, 0), bool)
            else:
                packed = np.ascontiguousarray(np.concatenate([u.view(np.uint8).reshape(rows, -1) for u in user], 1))
                values = packed.view(np.dtype((np.void, packed.shape[1]))).reshape(rows)
                change = (packed[1:] != packed[:-1]).any(1)
        starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)
        keys = values[starts]
        uniq, counts = np.unique(keys, return_counts=True)
        if (counts > 1).any():
            what = f"column {key_col!r}" if key_col else "the user-side input columns"
            raise BadInputError(f"{path}: the rows of one user are not consecutive ({what}: a user's rows "
                                "start again after another user's)", "sort or group each file by user")
        return starts, [k.item() if not isinstance(k, np.void) else bytes(k) for k in keys]


def _request(feeds: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], starts: np.ndarray, rows: int) -> Request:
    lengths = np.diff(np.concatenate([starts, [rows]]))
    user_index = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)
    return Request(user={s.name: np.ascontiguousarray(feeds[s.name][starts]) for s in specs if s.user_side},
                   item={s.name: feeds[s.name] for s in specs if not s.user_side}, user_index=user_index)


def _padded(request: Request, users_per_call: int) -> Request:
    """``request`` grown to exactly ``users_per_call`` users and ROWS_PER_CALL candidates with copies
    of its last user and last candidate (scored, then dropped)."""
    users, n = request.num_users, request.num_candidates
    add_u, add_n = users_per_call - users, ROWS_PER_CALL - n
    user = {k: np.concatenate([v, np.repeat(v[-1:], add_u, axis=0)]) for k, v in request.user.items()}
    item = {k: np.concatenate([v, np.repeat(v[-1:], add_n, axis=0)]) for k, v in request.item.items()}
    index = np.concatenate([request.user_index, np.full(add_n, users - 1, np.int64)])
    return Request(user=user, item=item, user_index=index)


def _taus(path: str, starts: np.ndarray, keys: list[Any], rows: int, ref: np.ndarray,
          cand: np.ndarray) -> tuple[TauStats, list[tuple[str, Any, np.ndarray, np.ndarray]]]:
    """Kendall tau of every run inside the batch; the first and last runs as fragments."""
    ends = np.concatenate([starts[1:], [rows]])
    tau = TauStats()
    tau.add(np.asarray([kendall_tau(ref[s:e], cand[s:e]) for s, e in zip(starts[1:-1], ends[1:-1])]))
    edge = {0, len(starts) - 1}
    fragments = [(path, keys[i], ref[starts[i]:ends[i]].copy(), cand[starts[i]:ends[i]].copy()) for i in sorted(edge)]
    return tau, fragments


class Fragments:
    """Edge runs of batches, joined by (file, user key) until their file is done."""

    def __init__(self) -> None:
        self.parts: dict[tuple[str, Any], tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def add(self, items: list[tuple[str, Any, np.ndarray, np.ndarray]]) -> None:
        for path, key, ref, cand in items:
            r, c = self.parts.setdefault((path, key), ([], []))
            r.append(ref)
            c.append(cand)

    def finish(self, tau: TauStats, path: str | None = None) -> None:
        """Fold the runs of ``path`` (all, when None) into ``tau``; Kendall tau ignores row order."""
        done = [k for k in self.parts if path is None or k[0] == path]
        taus = [kendall_tau(np.concatenate(self.parts[k][0]), np.concatenate(self.parts[k][1])) for k in done]
        for k in done:
            del self.parts[k]
        tau.add(np.asarray(taus, dtype=np.float64))


def worker_error(e: BaseException, path: str | Path) -> MixexportError:
    """An I/O failure while reading ``path`` as one line naming the file."""
    if isinstance(e, FileNotFoundError):
        return BadInputError(f"{path}: the file disappeared during the run ({e.strerror or e})",
                             "keep the input files in place until the run ends; nothing was written")
    return BadInputError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})",
                         "check the file (pyarrow.parquet.read_metadata) or remove it from --data")

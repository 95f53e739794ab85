"""The ``ray`` engine: Ray Data hands pieces of the files (a file's consecutive row groups, about
``--batch-rows`` rows each: ``from_items``) to a pool of actors (``map_batches`` with an actor
class). Each actor opens the bundle and the reference once, reads its piece itself with pyarrow, in
batches of at most ``--batch-rows`` rows, and returns the partials (verify) or the output rows
(score), which the driver merges or writes. Nothing holds all the scores, and no input row passes
through Ray's object store.

Why the actors read, and not ``read_parquet``: the reads run far ahead of the scoring, and every
block they produce waits in the object store, whose pages stay mapped in each worker that touched
them. Measured on rankmixer tiny (2 actors, 16 files): the summed RSS of a run grew from 3.8 GB at
1M rows to 8.2 GB at 8M, and capping the store only made Ray spill to disk. A piece read by the
actor that scores it costs one batch of memory, whatever the data's size.

Sizing: the actors together ask for at most ``cpus - 1`` CPUs (each ``(cpus - 1) / workers``, at
most 1), so one CPU always stays free for the driver (merging partials, writing scores) and for
Ray Data's own small tasks; with whole-CPU actors on every core those never get scheduled.

Without ``--address`` a local Ray starts with the machine's cores and is shut down at the end; an
already initialised Ray (a test fixture, a notebook) is used as it is and left running.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from mixexport.errors import BadInputError, EnvironmentUnavailableError, MixexportError
from mixexport.scale.sink import Sink
from mixexport.scale.worker import Job, Worker, worker_error

INSTALL_HINT = 'pip install "mixexport[ray]"'
#: Object store of the local Ray the engine starts (Ray's default: 30 % of the machine's memory).
#: Only the actors' outputs pass through it (partials, or a piece's scores): a small store bounds
#: the pages a run maps, whatever the data's size.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


class _ScaleActor:
    """One Ray actor: a :class:`Worker` opened once, called per piece of a file."""

    def __init__(self, job: Job, batch_rows: int, columns: list[str]) -> None:
        self.worker = Worker(job)
        self.batch_rows, self.columns = batch_rows, columns

    def __call__(self, pieces: Any) -> Any:
        import pyarrow as pa

        from mixexport.scale.reader import read_batches

        out = []
        for path, groups in zip(pieces.column("path").to_pylist(), pieces.column("row_groups").to_pylist()):
            for table in read_batches(path, self.batch_rows, self.columns, groups):
                part = self.worker.process(path, table)
                if "table" in part:
                    t = part.pop("table")
                    out.append(t.add_column(0, "path", pa.array([path] * t.num_rows, pa.string())))
                else:
                    out.append(pa.table({"path": [path], "part": [pickle.dumps(part)]}))
        return pa.concat_tables(out)


def pieces(files: list[str], batch_rows: int) -> list[dict[str, Any]]:
    """Every file cut into runs of consecutive row groups of about ``batch_rows`` rows (a row group
    is never split): what one actor call reads. Files in order, pieces in file order."""
    import pyarrow as pa

    from mixexport.scale.files import footer

    out: list[dict[str, Any]] = []
    for path in files:
        try:
            meta = footer(path)
        except (OSError, pa.ArrowException) as e:
            raise worker_error(e, path) from None
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= batch_rows:
                out.append({"path": path, "row_groups": groups})
                groups, rows = [], 0
        if groups:
            out.append({"path": path, "row_groups": groups})
    return out


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    try:
        import ray
    except ImportError:
        raise EnvironmentUnavailableError("the ray engine needs Ray Data, which is not installed", INSTALL_HINT) from None
    started = False
    if not logging.getLogger("mixexport").isEnabledFor(logging.INFO):
        logging.getLogger("ray").setLevel(logging.ERROR)  # e.g. the token-authentication notice at start
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                         include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            what = f"attach to the Ray cluster at {address}" if address else "start a local Ray"
            raise EnvironmentUnavailableError(f"could not {what}: {str(e).splitlines()[0][:200]}",
                                              "check --address (ray status), or use --engine local") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def sizes(cpus: float, workers: int) -> float:
    """CPUs per actor: together the actors never take the last CPU (see the module doc)."""
    return max(0.0, min(1.0, (cpus - 1.0) / workers))


def run_ray(files: list[str], job: Job, batch_rows: int, columns: list[str], sink: Sink, workers: int,
            address: str | None, ordered: bool) -> dict[str, Any]:
    """Score every file on Ray Data; partials (or output rows, in input order when ``ordered``) go to ``sink``."""
    work = pieces(files, batch_rows)
    with ray_session(address) as ray:
        import ray.data

        cpus = float(ray.cluster_resources().get("CPU", 1))
        actor_cpus = sizes(cpus, workers)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = ordered
        ctx.enable_progress_bars = False  # our own progress goes to stderr; Ray's logs stay in /tmp/ray
        if not logging.getLogger("mixexport").isEnabledFor(logging.INFO):  # -v shows Ray's own log lines
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors come back as ours, one line
        ds = ray.data.from_items(work, override_num_blocks=len(work))
        with warnings.catch_warnings():  # max_restarts has no named form yet (pyproject pins ray < 2.64)
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(_ScaleActor, fn_constructor_kwargs={"job": job, "batch_rows": batch_rows,
                                                                    "columns": columns},
                                batch_size=1, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=workers),
                                num_cpus=actor_cpus, max_restarts=0, max_task_retries=0)
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                _deliver(batch, sink)
        except MixexportError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray wraps the actor's exception; find ours, or say what died
            raise _translate(e, files) from None
        for path in files:
            sink.file_done(path)
        return {"engine": "ray", "workers": workers, "actor_cpus": actor_cpus, "pieces": len(work),
                "cluster_cpus": cpus}


def _deliver(batch: Any, sink: Sink) -> None:
    import numpy as np

    paths = batch.column("path").to_numpy(zero_copy_only=False)
    if "part" in batch.schema.names:
        for path, blob in zip(paths, batch.column("part").to_pylist()):
            sink.part(str(path), pickle.loads(blob))  # noqa: S301 - our own actors' partials
        return
    cut = np.flatnonzero(paths[1:] != paths[:-1]) + 1
    bounds = np.concatenate([[0], cut, [len(paths)]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        sink.part(str(paths[a]), {"table": batch.slice(int(a), int(b - a)).drop_columns(["path"])})


def _translate(e: BaseException, files: list[str]) -> MixexportError:
    """Ray's wrapped failure as one line: our own error from inside an actor, a file that went
    missing, or an actor that died."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:  # RayTaskError chains the user's exception as its cause
        seen.add(id(cur))
        cause = getattr(cur, "cause", None)  # a RayTaskError carries the actor's own exception
        if isinstance(cause, MixexportError):
            return type(cause)(cause.message, cause.hint)
        if isinstance(cur, MixexportError):
            return cur
        cur = cur.__cause__ or cur.__context__
    text = str(e)
    for name in ("BadInputError", "EnvironmentUnavailableError", "GateFailedError"):
        if name in text:  # a RayTaskError(BadInputError) whose cause did not survive pickling
            line = next((ln for ln in text.splitlines() if ln.startswith("mixexport.errors." + name)), "")
            return BadInputError(line.split(": ", 1)[-1] or text.splitlines()[0][:300])
    gone = [f for f in files if not os.path.exists(f)]
    if gone:
        return BadInputError(f"{gone[0]}: the file disappeared during the run", "keep the input files in place "
                             "until the run ends; nothing was written")
    kind = type(e).__name__
    if "ActorDied" in kind or "ActorDied" in text or "RayActorError" in text or "actor died" in text.lower():
        return EnvironmentUnavailableError(f"a Ray actor died while scoring ({kind}); the run is incomplete and "
                                           "no report was written", "check the workers' memory and logs (ray logs), "
                                           "then run again")
    return EnvironmentUnavailableError(f"the Ray run failed ({kind}: {text.splitlines()[0][:240] if text else ''}); "
                                       "no report was written", "run again with --engine local to see the input's error")

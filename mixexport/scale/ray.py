"""The ``ray`` engine: Ray Data reads the files (``read_parquet``) and a pool of actors scores the
batches (``map_batches`` with an actor class). Each actor opens the bundle and the reference once;
per batch it returns the partial (verify) or the output rows (score), which the driver merges or
writes. Nothing holds all the scores.

Sizing: the actors together ask for at most ``cpus - 1`` CPUs (each ``(cpus - 1) / workers``, at
most 1), so one whole CPU always stays free for Ray Data's own tasks (listing the files, reading
them: each asks for one CPU). Two actors on two cores take 0.5 each; with whole-CPU actors Ray Data
deadlocks: both CPUs held, the file listing and the reads never run.

Without ``--address`` a local Ray starts with the machine's cores and is shut down at the end; an
already initialised Ray (a test fixture, a notebook) is used as it is and left running.
"""

from __future__ import annotations

import logging
import os
import pickle
from contextlib import contextmanager
from typing import Any, Iterator

from mixexport.errors import BadInputError, EnvironmentUnavailableError, MixexportError
from mixexport.scale.sink import Sink
from mixexport.scale.worker import Job, Worker

INSTALL_HINT = 'pip install "mixexport[ray]"'


class _ScaleActor:
    """One Ray actor: a :class:`Worker` opened once, called per batch."""

    def __init__(self, job: Job) -> None:
        self.worker = Worker(job)

    def __call__(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        paths = batch.column("path").to_numpy(zero_copy_only=False)
        cut = np.flatnonzero(paths[1:] != paths[:-1]) + 1
        bounds = np.concatenate([[0], cut, [len(paths)]])
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):  # a batch may hold the end of one file and the start of the next
            path = str(paths[a])
            part = self.worker.process(path, batch.slice(int(a), int(b - a)))
            if "table" in part:
                t = part.pop("table")
                out.append(t.add_column(0, "path", pa.array([path] * t.num_rows, pa.string())))
            else:
                out.append(pa.table({"path": [path], "part": [pickle.dumps(part)]}))
        return pa.concat_tables(out)


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
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
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


def sizes(cpus: float, workers: int) -> tuple[float, float]:
    """(CPUs per actor, CPUs per read task): the actors never take the last CPU (see the module doc)."""
    return max(0.0, min(1.0, (cpus - 1.0) / workers)), 1.0


def run_ray(files: list[str], job: Job, batch_rows: int, columns: list[str], sink: Sink, workers: int,
            address: str | None, ordered: bool) -> dict[str, Any]:
    """Score every file on Ray Data; partials (or output rows, in input order when ``ordered``) go to ``sink``."""
    with ray_session(address) as ray:
        import ray.data

        cpus = float(ray.cluster_resources().get("CPU", 1))
        actor_cpus, read_cpus = sizes(cpus, workers)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = ordered
        ctx.enable_progress_bars = False  # our own progress goes to stderr; Ray's logs stay in /tmp/ray
        if not logging.getLogger("mixexport").isEnabledFor(logging.INFO):  # -v shows Ray's own log lines
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors come back as ours, one line
        ds = ray.data.read_parquet(files, columns=columns, include_paths=True, num_cpus=read_cpus)
        ds = ds.map_batches(_ScaleActor, fn_constructor_kwargs={"job": job}, batch_size=batch_rows,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=actor_cpus,
                            max_restarts=0, max_task_retries=0)
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                _deliver(batch, sink)
        except MixexportError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray wraps the actor's exception; find ours, or say what died
            raise _translate(e, files) from None
        for path in files:
            sink.file_done(path)
        return {"engine": "ray", "workers": workers, "actor_cpus": actor_cpus, "read_cpus": read_cpus,
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

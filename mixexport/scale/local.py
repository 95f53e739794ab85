"""The ``local`` engine: one process, pyarrow only. Streams each file in batches of at most
``batch_rows`` rows (only the columns the run reads) through one :class:`~mixexport.scale.worker.Worker`;
memory is one batch plus the running totals, whatever the data's size."""

from __future__ import annotations

from typing import Any

from mixexport.scale.reader import read_batches
from mixexport.scale.sink import Sink
from mixexport.scale.worker import Job, Worker


def run_local(files: list[str], job: Job, batch_rows: int, columns: list[str], sink: Sink) -> dict[str, Any]:
    """Score every file in order; each batch's partial goes to ``sink``. Returns engine facts."""
    worker = Worker(job)
    try:
        for path in files:
            for table in read_batches(path, batch_rows, columns):
                sink.part(path, worker.process(path, table))
            sink.file_done(path)
    finally:
        worker.close()
    return {"engine": "local", "workers": 1}

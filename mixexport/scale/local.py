"""The ``local`` engine: one process, pyarrow only. Streams each file in batches of at most
``batch_rows`` rows (only the columns the run reads) through one :class:`~mixexport.scale.worker.Worker`;
memory is one batch plus the running totals, whatever the data's size."""

from __future__ import annotations

from typing import Any

from mixexport.scale.sink import Sink
from mixexport.scale.worker import Job, Worker, worker_error


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


def read_batches(path: str, batch_rows: int, columns: list[str], row_groups: list[int] | None = None) -> Any:
    """Tables of at most ``batch_rows`` rows of ``path`` (only ``columns``; only ``row_groups``
    when given), read one at a time; a file deleted, truncated or corrupt while read is one line
    naming it (what every engine's worker reads through)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        for batch in _guarded(reader.iter_batches(batch_size=batch_rows, columns=columns, row_groups=row_groups),
                              path):
            yield pa.Table.from_batches([batch])
    except OSError as e:  # deleted or truncated while we read it
        raise worker_error(e, path) from None


def _guarded(batches: Any, path: str) -> Any:
    """pyarrow raises ArrowInvalid (not OSError) for a corrupt page: one line naming the file."""
    import pyarrow as pa

    try:
        yield from batches
    except pa.ArrowException as e:
        if isinstance(e, OSError):
            raise
        raise worker_error(e, path) from None

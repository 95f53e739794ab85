"""The ``local`` engine: one process, pyarrow only. Streams each file in batches of at most
``batch_rows`` rows (only the columns the run reads) through one :class:`~mixexport.scale.worker.Worker`;
memory is one batch plus the running totals, whatever the data's size."""

from __future__ import annotations

from typing import Any

from mixexport.scale.sink import Sink
from mixexport.scale.worker import Job, Worker, worker_error


def run_local(files: list[str], job: Job, batch_rows: int, columns: list[str], sink: Sink) -> dict[str, Any]:
    """Score every file in order; each batch's partial goes to ``sink``. Returns engine facts."""
    import pyarrow.parquet as pq

    worker = Worker(job)
    try:
        for path in files:
            try:
                reader = pq.ParquetFile(path)
                batches = reader.iter_batches(batch_size=batch_rows, columns=columns)
                for batch in _guarded(batches, path):
                    import pyarrow as pa

                    sink.part(path, worker.process(path, pa.Table.from_batches([batch])))
            except OSError as e:  # deleted or truncated while we read it
                raise worker_error(e, path) from None
            sink.file_done(path)
    finally:
        worker.close()
    return {"engine": "local", "workers": 1}


def _guarded(batches: Any, path: str) -> Any:
    """pyarrow raises ArrowInvalid (not OSError) for a corrupt page: one line naming the file."""
    import pyarrow as pa

    try:
        yield from batches
    except pa.ArrowException as e:
        if isinstance(e, OSError):
            raise
        raise worker_error(e, path) from None

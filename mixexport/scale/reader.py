"""The one Parquet reader of every engine: a file's batches of at most ``batch_rows`` rows (only the
columns the run reads, optionally only some row groups), read one at a time; a file deleted,
truncated or corrupt while it is read is one line naming it."""

from __future__ import annotations

from typing import Any

from mixexport.scale.worker import worker_error


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

"""Where the engines' per-batch results go, on the driver: verify merges partials into
:class:`~mixexport.scale.totals.Totals`; score appends each batch's output rows to its input file's
output (written under a temporary directory that replaces ``--out`` only when every file is done)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixexport.scale.totals import Totals


class Sink:
    def part(self, path: str, part: dict[str, Any]) -> None:
        raise NotImplementedError

    def file_done(self, path: str) -> None:
        raise NotImplementedError


class VerifySink(Sink):
    def __init__(self) -> None:
        self.totals = Totals()

    def part(self, path: str, part: dict[str, Any]) -> None:
        self.totals.merge(part)

    def file_done(self, path: str) -> None:
        self.totals.finish_file(path)


class ScoreSink(Sink):
    """One Parquet file per input file, rows in input order, with a ``row`` column (the row's index
    in its input file) before the key, label and output columns. Batches of a file arrive in order."""

    def __init__(self, workdir: Path, names: dict[str, str]) -> None:
        self.workdir = workdir
        self.names = names  # input path -> output file name
        self.writer: Any = None
        self.current: str | None = None
        self.rows = 0
        self.written: dict[str, int] = {}

    def part(self, path: str, part: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if path != self.current:
            self.file_done(self.current) if self.current is not None else None
            self.current, self.rows = path, 0
        table = part["table"]
        n = table.num_rows
        table = table.add_column(0, "row", pa.array(range(self.rows, self.rows + n), pa.int64()))
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.workdir / self.names[path], table.schema)
        self.writer.write_table(table)
        self.rows += n

    def file_done(self, path: str) -> None:
        if path != self.current:
            return
        if self.writer is not None:
            self.writer.close()
        self.writer, self.current = None, None
        self.written[path] = self.rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

"""The input files of a data-set run: expanded from ``--data`` (a file, a directory of ``*.parquet``
or a glob), each one's footer read and checked against the bundle before any scoring starts (a
missing column, a wrong type or list length, an empty or unreadable file fail at once, naming the
file); and the rules for ``score --out``."""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path
from typing import Any

from mixexport.errors import BadInputError
from mixexport.scale.schema import Columns, check_schema
from mixexport.specs import TensorSpec


def expand(data: str) -> list[str]:
    """Sorted Parquet paths named by ``data``; at least one."""
    path = Path(data)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.parquet"))
    elif any(c in data for c in "*?["):
        found = sorted(p for p in glob.glob(data) if Path(p).is_file())
    elif path.is_file():
        found = [str(path)]
    else:
        raise BadInputError(f"--data {data}: no such file or directory", "pass a .parquet file, a directory or a glob")
    found = [str(Path(f).resolve()) for f in found]  # one spelling: Ray reports rows by absolute path
    if not found:
        raise BadInputError(f"--data {data}: no Parquet files found", "pass 'dir/*.parquet' or a directory of them")
    return found


def has_column(path: str, name: str) -> bool:
    try:
        return name in footer(path).schema.to_arrow_schema().names
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return False  # check_files names the unreadable file


def footer(path: str) -> Any:
    """``path``'s Parquet footer (``pyarrow.parquet.FileMetaData``), read once per version of the
    file: the driver checks every footer before scoring, and the ray engine then cuts the files
    into pieces by their row groups (a data set of many files would read every footer twice)."""
    st = os.stat(path)
    return _footer(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1024)
def _footer(path: str, _mtime_ns: int, _size: int) -> Any:
    import pyarrow.parquet as pq

    return pq.read_metadata(path)


def check_files(files: list[str], specs: tuple[TensorSpec, ...], columns: Columns) -> int:
    """Check every file's footer; returns the total row count."""
    import pyarrow as pa

    total = 0
    for path in files:
        try:
            meta = footer(path)
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise BadInputError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})",
                                "check the file, or remove it from --data") from None
        if meta.num_rows == 0:
            raise BadInputError(f"{path}: the file has no rows", "remove empty files from --data")
        check_schema(path, schema, specs, columns)
        total += meta.num_rows
    return total


def output_names(files: list[str]) -> dict[str, str]:
    """Output file name per input: its own name, unless two inputs share one (then numbered)."""
    names = [Path(f).name for f in files]
    if len(set(names)) == len(names):
        return dict(zip(files, names))
    return {f: f"{i:05d}-{Path(f).name}" for i, f in enumerate(files)}

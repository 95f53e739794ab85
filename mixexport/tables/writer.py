"""Write a table's part files, streaming.

The table is read in chunks of whole rows (:data:`CHUNK_BYTES`) in id order; every chunk's rows are
split by partition (:func:`~mixexport.tables.layout.partition_of`) and appended to that partition's
open files, so each partition's rows stay ordered by id and the process never holds more than one
chunk (a fixed buffer, smaller than one partition) of the table. A first pass counts the rows of
every partition, so each ``.npy`` header is written before its rows.

When the weight is a view of a memory-mapped checkpoint (``torch.load(mmap=True)``), the pages of a
chunk are handed back to the kernel once written (:func:`mixexport.pages.page_out`): reading a 4 GB table
through the mapping would otherwise keep all of it resident and count it in the process's RSS.
MADV_PAGEOUT never discards data (anonymous pages go to swap, if any; clean file pages are
re-read on the next access), so it is safe on a weight that is not file-backed too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from mixexport.pages import page_out
from mixexport.tables.layout import TableEntry, encode_rows, part_file, partition_of, table_version

CHUNK_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class TableData:
    """A table chosen by the pass, not yet written: its manifest entry (without parts or version)
    and the weight ``[rows, dim]`` (a torch tensor; on a memory-mapped checkpoint, a mapped view)."""

    entry: TableEntry
    weight: Any

    def numpy_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32 numpy (a copy)."""
        import torch

        with torch.no_grad():
            return self.weight[start:stop].detach().to(torch.float32).numpy().copy()


class _Part:
    """The open files of one partition and the sha256 of each, updated as rows are appended."""

    def __init__(self, root: Path, entry: TableEntry, k: int, count: int) -> None:
        self.count = count
        self.rels = {"file": part_file(entry.name, k, entry.partitions),
                     "ids": part_file(entry.name, k, entry.partitions, "ids")}
        specs = {"file": (np.dtype(entry.dtype), (count, entry.dim)), "ids": (np.dtype(np.int64), (count,))}
        if entry.dtype == "int8":
            self.rels["scale"] = part_file(entry.name, k, entry.partitions, "scale")
            specs["scale"] = (np.dtype(np.float32), (count,))
        self.files: dict[str, IO[bytes]] = {}
        self.hashes = {key: hashlib.sha256() for key in self.rels}
        for key, rel in self.rels.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "wb")  # noqa: SIM115 - closed in close()
            self.files[key] = f
            dtype, shape = specs[key]
            header = _npy_header(dtype, shape)
            f.write(header)
            self.hashes[key].update(header)

    def append(self, key: str, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr).tobytes()
        self.files[key].write(data)
        self.hashes[key].update(data)

    def close(self) -> dict[str, str]:
        for f in self.files.values():
            f.close()
        return {self.rels[k]: h.hexdigest() for k, h in self.hashes.items()}


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_table(data: TableData, root: Path, chunk_bytes: int = CHUNK_BYTES) -> tuple[TableEntry, dict[str, str]]:
    """Write ``data``'s part files under ``root`` (the bundle being written). Returns the entry with
    its parts and version, and every file's sha256 by bundle-relative path."""
    entry = data.entry
    P, rows = entry.partitions, entry.rows
    chunk = max(1, chunk_bytes // max(1, entry.dim * 4))
    counts = np.zeros(P, dtype=np.int64)
    for start in range(0, rows, chunk):
        counts += np.bincount(partition_of(np.arange(start, min(rows, start + chunk)), P), minlength=P)
    parts = [_Part(root, entry, k, int(counts[k])) for k in range(P)]
    digests: dict[str, str] = {}
    try:
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            block = data.numpy_rows(start, stop)
            page_out(data.weight, start, stop)
            ids = np.arange(start, stop, dtype=np.int64)
            which = partition_of(ids, P)
            order = np.argsort(which, kind="stable")  # stable: ids stay ascending inside a partition
            bounds = np.searchsorted(which[order], np.arange(P + 1))
            stored, scale = encode_rows(block[order], entry.dtype)
            for k in np.flatnonzero(np.diff(bounds)):
                a, b = bounds[k], bounds[k + 1]
                parts[k].append("file", stored[a:b])
                parts[k].append("ids", ids[order[a:b]])
                if scale is not None:
                    parts[k].append("scale", scale[a:b])
            del block, stored
    finally:
        for p in parts:
            digests.update(p.close())
    part_json = tuple({"rows": p.count, "file": p.rels["file"], "ids": p.rels["ids"], "scale": p.rels.get("scale")}
                      for p in parts)
    done = replace(entry, parts=part_json)
    return replace(done, version=table_version(done, digests)), digests


def write_tables(tables: tuple[TableData, ...], root: Path) -> list[TableEntry]:
    """Every table of a bundle, one after the other (one table's chunk in memory at a time)."""
    return [write_table(t, root)[0] for t in tables]

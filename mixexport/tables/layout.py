"""How an externalized table is laid out on disk and described in the manifest.

The id → (partition, row) rule: id ``i`` of a table with ``P`` partitions lives in partition
``splitmix64(i) % P``; inside a partition the rows are ordered by id, and the partition's ids file
(``part-<k>-of-<P>.ids.npy``, int64, ascending) says which id each row holds, so the row of ``i`` is
``searchsorted(ids_k, i)``. splitmix64 spreads consecutive ids evenly over the partitions (a plain
``i % P`` would put every column of a multi-column table, which are offset ranges, into a few
partitions); it is the finalizer of Java's SplittableRandom, simple to reimplement in any language:

    z = (i + 0x9E3779B97F4A7C15) mod 2^64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 mod 2^64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB mod 2^64
    z =  z ^ (z >> 31)

Files of table ``T``, partition ``k`` of ``P``, under ``tables/T/``: ``part-k-of-P.npy`` (the rows,
``[n_k, dim]`` in the storage dtype), ``part-k-of-P.ids.npy`` and, for int8 rows,
``part-k-of-P.scale.npy`` (float32 ``[n_k]``: row = int8 row × scale).

The ``tables_version`` digest binds the dense segments to the exact tables they were built with:
each table's ``version`` is the sha256 of its shape, dtypes, rule and every part file's sha256; the
bundle's ``tables_version`` is the sha256 of the table names and versions. Every dense segment
records it; a runtime refuses a bundle whose tables differ from what its segments record.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from mixexport.specs import TensorSpec

#: storage dtypes of the rows; the graph always receives float rows (its own dtype)
DTYPES = ("float32", "float16", "int8")
RULE = "splitmix64(id) % partitions; rows ordered by id inside a partition"
PART_BYTES = 256 * 1024**2    # default partition size: a table of B bytes gets ceil(B / PART_BYTES) parts
MAX_PARTITIONS = 1024
#: table names: what the manifest name rule allows in a path component and a Redis key
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")

_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer of every id (int64 or uint64 array) as uint64, vectorized."""
    z = np.asarray(ids).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _C1
        z = (z ^ (z >> np.uint64(30))) * _C2
        z = (z ^ (z >> np.uint64(27))) * _C3
    return z ^ (z >> np.uint64(31))


def partition_of(ids: np.ndarray, partitions: int) -> np.ndarray:
    """The partition (int64) of every id under the layout rule."""
    return (splitmix64(ids) % np.uint64(partitions)).astype(np.int64)


def default_partitions(nbytes: int) -> int:
    """One partition per :data:`PART_BYTES` of stored rows, at least 1, at most :data:`MAX_PARTITIONS`."""
    return int(min(MAX_PARTITIONS, max(1, math.ceil(nbytes / PART_BYTES))))


def part_file(table: str, k: int, partitions: int, kind: str = "rows") -> str:
    """Bundle-relative path of a part file: ``kind`` is ``rows``, ``ids`` or ``scale``."""
    suffix = {"rows": "", "ids": ".ids", "scale": ".scale"}[kind]
    return f"tables/{table}/part-{k}-of-{partitions}{suffix}.npy"


def table_name(param: str) -> str:
    """A table's name from its parameter's qualified name: ``embed.item_table.weight`` →
    ``embed_item_table`` (dots become underscores, a trailing ``.weight`` is dropped)."""
    base = param[:-len(".weight")] if param.endswith(".weight") else param
    return re.sub(r"[^A-Za-z0-9_]", "_", base).lstrip("_") or "table"


def rows_input_name(input_name: str, column: int | None, table: str) -> str:
    """The float input that replaces a lookup: ``<id input>__<table>``, or
    ``<id input>_c<column>__<table>`` when the lookup reads one column of a multi-column input."""
    col = "" if column is None else f"_c{column}"
    return f"{input_name}{col}__{table}"


# --------------------------------------------------------------------------------------------
# row encoding (shared by the writer and the in-memory store, so the build's checks see the
# rows the bundle will serve)

def encode_rows(rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Float rows ``[n, dim]`` → (stored rows, per-row float32 scale for int8 or None)."""
    rows = np.asarray(rows, dtype=np.float32)
    if dtype == "float32":
        return rows, None
    if dtype == "float16":
        return rows.astype(np.float16), None
    amax = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(len(rows), np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def decode_rows(stored: np.ndarray, scale: np.ndarray | None, graph_dtype: str) -> np.ndarray:
    """Stored rows (+ scale) → the rows the graph takes, in its dtype."""
    out = stored.astype(np.float32) * scale[:, None] if scale is not None else stored
    return np.asarray(out, dtype=graph_dtype)


# --------------------------------------------------------------------------------------------
# the manifest entry

@dataclass(frozen=True)
class TableUse:
    """One id input a table serves: global row = ``ids[..., column]`` (or all of ``ids``) +
    ``offsets`` (one per last-axis column, or one for all), replaced in the graph by ``rows``."""

    input: str
    column: int | None
    offsets: tuple[int, ...]
    rows: TensorSpec

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input, "column": self.column, "offsets": list(self.offsets),
                "rows_input": self.rows.to_json()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TableUse:
        return cls(d["input"], d.get("column"), tuple(d.get("offsets") or (0,)), TensorSpec.from_json(d["rows_input"]))

    def global_ids(self, ids: np.ndarray) -> np.ndarray:
        """The table rows this use reads for the id input's values (int64, shape of the rows input
        without its last axis)."""
        sel = ids if self.column is None else np.take(ids, self.column, axis=-1)
        return sel.astype(np.int64, copy=False) + np.asarray(self.offsets, dtype=np.int64)


@dataclass(frozen=True)
class TableEntry:
    """A table as the manifest records it (see the module docstring and docs/tables.md)."""

    name: str
    rows: int
    dim: int
    dtype: str                       # storage: float32 | float16 | int8
    graph_dtype: str                 # what the rows inputs carry
    partitions: int
    padding_idx: int | None
    uses: tuple[TableUse, ...]
    parts: tuple[dict[str, Any], ...] = ()   # per partition: rows, file, ids, scale (or None)
    version: str = ""
    source: str = ""                 # the parameter the table was taken from
    extra: dict[str, Any] = field(default_factory=dict)

    def files(self) -> list[str]:
        return [p[k] for p in self.parts for k in ("file", "ids", "scale") if p.get(k)]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "dim": self.dim, "dtype": self.dtype,
                "graph_dtype": self.graph_dtype, "partitions": self.partitions, "rule": RULE,
                "padding_idx": self.padding_idx, "missing": "error", "source": self.source,
                "inputs": [u.to_json() for u in self.uses], "parts": [dict(p) for p in self.parts],
                "version": self.version, **self.extra}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TableEntry:
        return cls(d["name"], d["rows"], d["dim"], d["dtype"], d["graph_dtype"], d["partitions"], d.get("padding_idx"),
                   tuple(TableUse.from_json(u) for u in d["inputs"]), tuple(dict(p) for p in d["parts"]),
                   d.get("version", ""), d.get("source", ""))


def table_version(entry: TableEntry, digests: Mapping[str, str]) -> str:
    """sha256 of the table's shape, dtypes, rule and its part files' sha256 (``digests``: path → sha256)."""
    body = {"name": entry.name, "rows": entry.rows, "dim": entry.dim, "dtype": entry.dtype,
            "graph_dtype": entry.graph_dtype, "partitions": entry.partitions, "rule": RULE,
            "files": [[rel, digests.get(rel)] for rel in entry.files()]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def tables_version(entries: list[TableEntry] | tuple[TableEntry, ...]) -> str:
    """The bundle's digest over its tables (name, version), in name order."""
    body = sorted((e.name, e.version) for e in entries)
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()

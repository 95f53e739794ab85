"""An in-memory store over the weights the pass took out: what the build's own checks (stage
ledger, ONNX export tracing, the pass's postcondition) score with before any file is written. Rows
go through the same encoding as the part files (float16, int8 with a per-row scale), so those
checks see the rows the bundle will serve."""

from __future__ import annotations

from typing import Any

import numpy as np

from mixexport.tables.layout import decode_rows, encode_rows
from mixexport.tables.stores.base import TableLookups, check_ids


class MemoryStore:
    """Lookups straight from the weight tensors of :class:`~mixexport.tables.writer.TableData`."""

    name = "memory"

    def __init__(self, tables: tuple[Any, ...]) -> None:
        self.tables = {t.entry.name: t for t in tables}

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        import torch

        data = self.tables[table]
        ids = np.asarray(ids, dtype=np.int64)
        check_ids(data.entry, ids)
        with torch.no_grad():
            rows = data.weight[torch.from_numpy(ids)].to(torch.float32).numpy()
        stored, scale = encode_rows(rows, data.entry.dtype)
        return decode_rows(stored, scale, data.entry.graph_dtype)

    def close(self) -> None:
        self.tables.clear()


def memory_lookups(tables: tuple[Any, ...]) -> TableLookups | None:
    """Lookups over a program-stage bundle's tables, or None when it has none."""
    return TableLookups(tuple(t.entry for t in tables), MemoryStore(tables)) if tables else None

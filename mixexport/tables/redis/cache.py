"""A process-local row cache per table, byte-bounded and vectorised: no Python work per id.

A per-id dict LRU hit 72–74 % of the rows of a Zipf workload yet did not lower the fetch's p50 (its
Python work per id cost what the hits saved). This one is a direct-mapped cache in one numpy array
of records, an id's key then its row: id ``i`` may only sit in slot ``i % slots``, and a newer
id that maps there replaces it. Ids are row numbers: the remainder sends consecutive ids (a table
sorted by frequency has its hot rows first) to distinct slots, costs one numpy call where a
multiplicative hash cost three, and hit the same rate on the shuffled Zipf benchmark.

Why direct-mapped, and the key inside the record. Between two requests the network and the other
processes evict the cache's arrays from the CPU's caches, so what a lookup costs is the numpy calls
(1–3 µs each on a few hundred ids, whatever their work) and the memory lines it touches. A lookup
here is one gather of the request's records (key and row come in the same lines), one compare and
the misses' positions; an insert is one scatter of whole records, so a key and its row can never
disagree, even when two ids of one request share a slot. The 2-way set-associative LRU this replaced kept keys and stamps
apart from the rows and wrote stamps on every hit: on 1M rows with 5 % cached, it hit 69 % of a
Zipf(1.1) workload's rows against 66 % here, and cost more client CPU than those 3 % saved on the
nodes (docs/tables.md has the interleaved measurement).

The cached values are the stored row bytes of one immutable table version (a store serves exactly
one version, so nothing is ever stale); a version change means a new store and a new cache.
"""

from __future__ import annotations

import numpy as np

KEY_BYTES = 8  # an int64 id heads every record; -1: an empty slot


class RowCache:
    """Rows of one table (``row_bytes`` each) in at most ``max_bytes`` (keys included)."""

    def __init__(self, row_bytes: int, max_bytes: int) -> None:
        self.row_bytes = row_bytes
        self.slots = int(max_bytes // (KEY_BYTES + row_bytes))
        self.records = np.zeros((self.slots, KEY_BYTES + row_bytes), dtype=np.uint8)
        self.records[:, :KEY_BYTES].view(np.int64)[:] = -1
        self.hits = 0
        self.lookups = 0

    @staticmethod
    def bytes_for(rows: int, row_bytes: int) -> int:
        """The bytes a cache of twice ``rows`` slots takes: more is never useful for a table of
        ``rows`` rows (fewer collisions past that gain little)."""
        return 2 * rows * (KEY_BYTES + row_bytes)

    @property
    def nbytes(self) -> int:
        return self.records.nbytes

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(positions of the misses, rows, slot of every id)`` for distinct row numbers ``ids``
        (int64, ≥ 0): ``rows[j]`` is id ``j``'s stored row unless ``j`` is a miss (junk there: the
        caller writes the fetched rows over it), a new array the caller owns."""
        self.lookups += ids.size
        if self.slots == 0:
            return np.arange(ids.size), np.zeros((ids.size, self.row_bytes), np.uint8), np.zeros(ids.size, np.int64)
        slot = np.remainder(ids, self.slots)
        found = self.records.take(slot, axis=0)
        miss = np.flatnonzero(found[:, :KEY_BYTES].view(np.int64)[:, 0] != ids)
        self.hits += ids.size - miss.size
        return miss, found[:, KEY_BYTES:], slot

    def insert(self, ids: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> None:
        """Put missed ``ids`` (their ``rows``; ``slots`` from :meth:`lookup`) in their slots, whole
        records at once: where two share a slot, one of them is kept, key and row together."""
        if self.slots == 0 or ids.size == 0:
            return
        records = np.empty((ids.size, KEY_BYTES + self.row_bytes), dtype=np.uint8)
        records[:, :KEY_BYTES].view(np.int64)[:, 0] = ids
        records[:, KEY_BYTES:] = rows
        self.records[slots] = records

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

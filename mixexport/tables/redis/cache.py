"""A process-local row cache per table, byte-bounded and vectorised: no Python work per id.

A per-id dict LRU hit 72–74 % of the rows of a Zipf workload yet did not lower the fetch's p50 (its
Python work per id cost what the hits saved). This one is a 2-way set-associative cache in numpy
arrays: id ``i`` may sit in either way of set ``hash(i)``; a lookup compares both ways for every
id at once, an insert replaces the least recently used way of each set. It is LRU within each
set of two, which approaches a full LRU's hit rate at a fraction of the cost.

The cached values are the stored row bytes of one immutable table version (a store serves exactly
one version, so nothing is ever stale); a version change means a new store and a new cache.
"""

from __future__ import annotations

import numpy as np

WAYS = 2
_GOLD = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hashing: the product's top 32 bits, mod sets


class RowCache:
    """Rows of one table (``row_bytes`` each) in at most ``max_bytes`` (keys and stamps included).

    The arrays are flat: set ``s`` holds slots ``2s`` and ``2s + 1``."""

    def __init__(self, row_bytes: int, max_bytes: int) -> None:
        self.row_bytes = row_bytes
        self.sets = int(max_bytes // (WAYS * (row_bytes + 16)))
        self.keys = np.full(self.sets * WAYS, -1, dtype=np.int64)
        self.stamps = np.zeros(self.sets * WAYS, dtype=np.int64)
        self.rows = np.empty((self.sets * WAYS, row_bytes), dtype=np.uint8)
        self.clock = 0
        self.hits = 0
        self.lookups = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.stamps.nbytes + self.rows.nbytes

    def _first_slots(self, ids: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            s = ((ids.astype(np.uint64) * _GOLD) >> np.uint64(32)) % np.uint64(self.sets)
        return s.astype(np.int64) * WAYS

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(hit mask, rows of the hits [h, row_bytes], first slot of every id's set)`` for
        distinct ``ids``."""
        self.lookups += ids.size
        if self.sets == 0:
            return np.zeros(ids.size, bool), self.rows[:0], np.zeros(ids.size, np.int64)
        first = self._first_slots(ids)
        in0 = self.keys[first] == ids
        in1 = self.keys[first + 1] == ids
        hit = in0 | in1
        slot = (first + in1)[hit]
        self.clock += 1
        self.stamps[slot] = self.clock
        self.hits += int(slot.size)
        return hit, self.rows[slot], first

    def put(self, ids: np.ndarray, rows: np.ndarray, first: np.ndarray) -> None:
        """Insert distinct ``ids`` (their ``rows``; ``first`` from :meth:`get`) into the least
        recently used way of their sets. Two ids of one request may pick the same slot: the key
        that landed there is read back, and only its row is written, so keys and rows never
        disagree."""
        if self.sets == 0 or ids.size == 0:
            return
        slot = first + (self.stamps[first + 1] < self.stamps[first])
        self.keys[slot] = ids
        won = self.keys[slot] == ids
        self.rows[slot[won]] = rows[won]
        self.stamps[slot[won]] = self.clock

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

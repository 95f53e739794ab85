"""Pick a bundle's table store from what the caller names: ``None``/``"local"`` (the bundle's part
files, memory-mapped) or a ``redis://…`` URL (Redis Cluster, published by ``mixexport publish``).
``Runtime.open(tables=…)`` calls it; ``verify``, ``bench`` and ``triton`` pass their ``--tables``
option down to that call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mixexport.errors import BadInputError

if TYPE_CHECKING:
    from mixexport.bundle import Manifest
    from mixexport.tables.stores.base import TableLookups


def open_store(manifest: Manifest, tables: str | None = None, verify_files: bool = True) -> TableLookups | None:
    """The bundle's tables over the named store, or None for a bundle without tables."""
    if tables is None or tables == "local":
        from mixexport.tables.stores.local import open_tables

        return open_tables(manifest, verify_files)  # part files checked like the segments' files
    if isinstance(tables, str) and tables.startswith("redis://"):
        from mixexport.tables.redis.store import open_redis_tables

        return open_redis_tables(manifest, tables)
    raise BadInputError(f"unknown table store {tables!r}", "expected 'local' or redis://HOST:PORT[,HOST:PORT...]")


def store_stats(lookups: TableLookups) -> dict[str, object]:
    """The store's name and per-table row-cache counters (the local store has no cache: empty)."""
    stats = getattr(lookups.store, "cache_stats", None)
    cache = {name: {"lookups": st["lookups"], "hits": st["hits"], "hit_rate": st["hit_rate"]}
             for name, st in (stats() if stats else {}).items()}
    return {"store": lookups.store.name, "cache": cache}

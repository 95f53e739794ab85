"""The ``redis`` table store: a bundle's tables, as published by ``mixexport publish``, read from
Redis Cluster.

One request is one round trip per node, all nodes in parallel: the distinct ids of every table are
grouped by bucket (one HMGET each) and by node, every node gets its commands, then every reply is
read. The pointer ``{mx:M}:current`` rides along in the same round trip, so it is re-read exactly
once per request at no extra latency: when it is not the bundle's ``tables_version`` the request is
refused (:class:`TablesVersionError`, naming both). Rows are read under the bundle's version only,
so a request never mixes two versions; a version whose rows are gone (dropped by ``--gc``) is an
error, never a zero row.

Exceptions (all :class:`~mixexport.errors.MixexportError`): :class:`BadInputError` for an unknown
id (the local store's message); :class:`TablesVersionError` for a version mismatch or missing rows;
:class:`StoreUnavailableError` (exit 3) for connection refused, a dead node or an error reply;
:class:`StoreTimeoutError` (a subclass) past the deadline. A MOVED/ASK reply or a dead node makes
the store re-read the slot map and retry while the deadline allows (after a failover the promoted
replica answers); otherwise it raises. Thread-safe: requests are serialised on one lock.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from mixexport.errors import StoreTimeoutError, StoreUnavailableError, TablesVersionError
from mixexport.tables.layout import TableEntry, decode_rows, table_version
from mixexport.tables.redis import keys as K
from mixexport.tables.redis.cache import RowCache
from mixexport.tables.redis.cluster import Cluster, ReplyError, pack
from mixexport.tables.redis.url import StoreUrl, parse_url
from mixexport.tables.stores.base import TableLookups, check_ids, check_version

if TYPE_CHECKING:
    from mixexport.bundle import Manifest

OPEN_TIMEOUT_S = 2.0   # opening (slot map, version record) may take longer than one request
RETRIES = 3            # slot-map refreshes per request, within its deadline


class _Redirect(Exception):
    """A MOVED/ASK reply: the slot map is stale."""


@dataclasses.dataclass
class _Table:
    entry: TableEntry
    partitions: int
    subs: int
    keys: list[bytes]
    slots: np.ndarray
    value_bytes: int
    cache: RowCache
    # per-table constants of the lookup path, and the routing cached per slot map
    heads: list[bytes] = dataclasses.field(init=False)   # per bucket: its HMGET header, ``% (n + 2)``
    width: int = dataclasses.field(init=False)           # bytes of a row's values (an int8 scale follows)
    f16_lut: bool = dataclasses.field(init=False)        # float16 rows into a float32 graph: _f16_to_f32
    bucket_dtype: type = dataclasses.field(init=False)   # small: argsort is then a radix sort
    bucket_table: np.ndarray | None = dataclasses.field(init=False)  # every row's bucket, or None
    owners: list[int] = dataclasses.field(init=False)    # per bucket: its master under ``generation``
    generation: int = -1                                 # of the slot map ``owners`` was read from

    def __post_init__(self) -> None:
        e = self.entry
        self.heads = [K.hmget_template(k) for k in self.keys]
        self.width = e.dim * np.dtype(e.dtype).itemsize
        self.f16_lut = (e.dtype, e.graph_dtype, self.width) == ("float16", "float32", self.value_bytes)
        self.bucket_dtype = np.uint16 if len(self.keys) <= 1 << 16 else np.int64
        self.bucket_table = K.bucket_table(e.rows, self.partitions, self.subs)
        self.owners = []


@functools.cache
def _f16_to_f32() -> np.ndarray:
    """float32 of every float16 bit pattern (256 KiB, bit-exact: made by numpy's own cast):
    decoding by ``take`` costs 1 ns a value, numpy's float16 cast 3."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def model_name(manifest: Manifest, url: StoreUrl, name: str | None = None) -> str:
    """The name tables are published under: ``--name``, else the URL's ``name=``, else the family."""
    return name or url.name or str(manifest.data["model"]["family"])


def read_record(cluster: Cluster, model: str, version: str, deadline: float) -> tuple[bytes | None, dict | None]:
    """``(current version, the version's record or None)`` in one round trip."""
    node = int(cluster.owner[K.key_slot(K.model_key(model, "current"))])
    cur, rec = cluster.roundtrip({node: [pack("GET", K.model_key(model, "current")),
                                         pack("HGET", K.model_key(model, "versions"), version)]}, deadline)[node]
    for r in (cur, rec):
        if isinstance(r, ReplyError):
            raise StoreUnavailableError(f"Redis node {cluster.nodes[node]} refused a read: {r}",
                                        "check the cluster's health (redis-cli --cluster check)")
    return cur, (json.loads(rec) if rec else None)


class RedisTableStore:
    """The tables of one ``tables_version`` from Redis Cluster (see the module docstring)."""

    name = "redis"

    def __init__(self, url: StoreUrl, model: str, entries: tuple[TableEntry, ...], version: str) -> None:
        """Connects (slot map), and refuses a version that is not published completely."""
        self.url, self.model, self.version = url, model, version
        self.deadline_s = url.deadline_s
        self.lock = threading.Lock()
        self.cluster = Cluster(url.nodes, timeout=OPEN_TIMEOUT_S)
        try:
            _, record = read_record(self.cluster, model, version, time.monotonic() + OPEN_TIMEOUT_S)
            if record is None or record.get("state") != "complete":
                raise TablesVersionError(f"tables_version {version[:16]}… of model {model!r} is not published in {url}"
                                         + ("" if record is None else " (its publish did not finish)"),
                                         f"publish it: mixexport publish BUNDLE --store {url} --name {model}")
            # not self._check_current(current): a published version may be opened before the flip (a
            # server loads the next bundle, then switches when the pointer names it); scoring checks
            self.pointer_key = K.model_key(model, "current")
            self.pointer_slot = K.key_slot(self.pointer_key)
            self.pointer_get = pack("GET", self.pointer_key)
            self.tables: dict[str, _Table] = {}
            for e in entries:
                lay = record["tables"].get(e.name)
                if lay is None:
                    raise TablesVersionError(f"table {e.name!r} is not in the published version {version[:16]}…",
                                             "publish the bundle again")
                vb = int(lay["value_bytes"])
                self.tables[e.name] = _Table(e, int(lay["partitions"]), int(lay["subs"]),
                                             [K.bucket_key(model, version, e.name, t) for t in lay["tags"]],
                                             np.asarray(lay["slots"], dtype=np.int64), vb,
                                             RowCache(vb, min(url.cache_bytes, RowCache.bytes_for(e.rows, vb))))
        except BaseException:
            self.cluster.close()
            raise

    def _check_current(self, current: Any) -> None:
        if current != self.version.encode():
            found = current.decode()[:16] + "…" if isinstance(current, bytes) else "none (nothing published)"
            raise TablesVersionError(f"Redis serves tables_version {found} for model {self.model!r}, the bundle's "
                                     f"segments were built with {self.version[:16]}…; refusing to score with other "
                                     "tables", "publish this bundle (mixexport publish), or score with the bundle "
                                     "that was published")

    # -- lookups --------------------------------------------------------------------------
    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Rows of distinct ``ids`` of one table (the :class:`TableStore` protocol)."""
        ids = np.asarray(ids, dtype=np.int64)
        check_ids(self.tables[table].entry, ids)
        return self.fetch({table: ids})[table]

    def fetch(self, wanted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded rows of every table's distinct ids (checked by the caller), in one round trip per
        node; retried after a slot-map refresh while the deadline allows."""
        with self.lock:
            deadline = time.monotonic() + self.deadline_s
            for attempt in itertools.count():
                try:
                    raw = self._fetch_once(wanted, deadline)
                    break
                except (_Redirect, StoreUnavailableError) as e:
                    if time.monotonic() >= deadline or attempt + 1 >= RETRIES or isinstance(e, StoreTimeoutError):
                        if isinstance(e, _Redirect):
                            raise StoreUnavailableError(f"Redis Cluster could not serve the request ({e})",
                                                        "retry; a failover or resharding is under way") from None
                        raise
                    self.cluster.refresh(deadline)
        return {name: self._decode(self.tables[name], rows) for name, rows in raw.items()}  # outside the lock

    def _fetch_once(self, wanted: dict[str, np.ndarray], deadline: float) -> dict[str, np.ndarray]:
        """One attempt: plan every table's HMGETs (row cache first), one round trip per node with
        the pointer's GET riding along, check the pointer; the stored row bytes of every table.

        This is the hot path (a 1×256 request is ~0.4 ms, and each numpy call on a few hundred
        ids costs 1–3 µs), so it is written for few numpy calls: no cache calls when the cache is
        off, the buckets read from the bucket table (one ``take``), a radix sort and one
        ``bincount`` to group them, the HMGET arguments sliced out of one buffer with no copies,
        the routing cached per slot map."""
        cluster = self.cluster
        payloads: dict[int, tuple[list[Any], int]] = {}
        plans = []
        for name, ids in wanted.items():
            t = self.tables[name]
            if t.cache.slots:
                miss, cached, slot = t.cache.lookup(ids)
                mids = ids.take(miss)
            else:
                cached = slot = miss = None
                mids = ids
            if t.bucket_table is not None:
                buckets = t.bucket_table.take(mids)
            else:
                buckets = K.bucket_of(mids, t.partitions, t.subs).astype(t.bucket_dtype)
            order = buckets.argsort(kind="stable")  # a radix sort
            counts = np.bincount(buckets, minlength=len(t.keys)).tolist()
            sids = mids.take(order)
            bulks = memoryview(K.field_bulks(sids).reshape(-1))
            if t.generation != cluster.generation:
                t.owners, t.generation = cluster.owner[t.slots].tolist(), cluster.generation
            where = []
            at = 0
            for b, n in enumerate(counts):
                if not n:
                    continue
                node = t.owners[b]
                if node < 0:
                    raise _Redirect(f"slot {int(t.slots[b])} has no master in the slot map")
                parts, k = payloads.get(node) or ([], 0)
                parts.append(t.heads[b] % (n + 2))
                parts.append(bulks[14 * at:14 * (at + n)])
                payloads[node] = (parts, k + 1)
                where.append((node, k))
                at += n
            plans.append((name, t, sids, order, where, cached, slot, miss))
        pnode = int(cluster.owner[self.pointer_slot])
        if pnode < 0:
            raise _Redirect(f"slot {self.pointer_slot} has no master in the slot map")
        parts, k = payloads.get(pnode) or ([], 0)
        parts.append(self.pointer_get)
        payloads[pnode] = (parts, k + 1)
        replies = cluster.exchange(payloads, deadline)
        current = replies[pnode][k]
        self._raise_errors(current)
        self._check_current(current)
        return {name: self._rows(t, sids, order, [replies[node][k] for node, k in where], cached, slot, miss)
                for name, t, sids, order, where, cached, slot, miss in plans}

    def _rows(self, t: _Table, sids: np.ndarray, order: np.ndarray, lists: list[Any], cached: np.ndarray | None,
              slot: np.ndarray | None, miss: np.ndarray | None) -> np.ndarray:
        """One table's stored row bytes in the order of its ids. ``lists``: the HMGET replies, the
        rows of ``sids`` (the ids not in the cache, sorted by bucket: ``mids[order]``); ``cached``,
        ``slot`` and ``miss``: every id's row as the cache holds it (junk for a miss), its cache slot
        and the misses' positions (None with the cache off). The fetched rows go into the cache."""
        n = sids.size
        for r in lists:
            self._raise_errors(r)
        try:
            joined = b"".join(itertools.chain.from_iterable(lists))
        except TypeError:  # a nil among the rows: the version's rows are gone
            joined = b""
        if len(joined) != n * t.value_bytes:
            raise TablesVersionError(f"table {t.entry.name!r}: rows of tables_version {self.version[:16]}… are "
                                     "missing from the cluster (the version was dropped or is incomplete); "
                                     "nothing was scored", "publish the bundle again")
        got = np.frombuffer(joined, dtype=np.uint8).reshape(n, t.value_bytes)
        if cached is None:
            rows = np.empty_like(got)
            rows[order] = got
            return rows
        if n:  # the fetched rows over the misses' junk
            at = miss.take(order)
            cached[at] = got
            t.cache.insert(sids, got, slot.take(at))
        return cached

    @staticmethod
    def _decode(t: _Table, rows: np.ndarray) -> np.ndarray:
        """Stored row bytes ``[n, value_bytes]`` → the rows the graph takes."""
        e = t.entry
        if t.f16_lut:  # a table lookup: numpy casts float16 one value at a time (~3 ns each)
            return _f16_to_f32().take(rows.view(np.uint16))
        stored = np.ascontiguousarray(rows[:, :t.width]).view(e.dtype)
        scale = np.ascontiguousarray(rows[:, t.width:t.width + 4]).view(np.float32)[:, 0] if e.dtype == "int8" else None
        return decode_rows(stored, scale, e.graph_dtype)

    @staticmethod
    def _raise_errors(reply: Any) -> None:
        if isinstance(reply, ReplyError):
            text = str(reply)
            if text.startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")):
                raise _Redirect(text)
            raise StoreUnavailableError(f"Redis refused a lookup: {text}", "check the cluster's health")

    # -- stats and lifetime ---------------------------------------------------------------
    def cache_stats(self) -> dict[str, dict[str, float]]:
        """Per table: rows looked up, cache hits, hit rate, bytes the cache holds."""
        return {n: {"lookups": t.cache.lookups, "hits": t.cache.hits, "hit_rate": round(t.cache.hit_rate, 4),
                    "bytes": t.cache.nbytes} for n, t in self.tables.items()}

    def close(self) -> None:
        self.cluster.close()


class RedisLookups(TableLookups):
    """The bundle's tables over a :class:`RedisTableStore`: every table of a request in one
    round trip per node (the base class would make one per table)."""

    store: RedisTableStore

    def rows(self, wanted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for entry in self.entries:  # the local store's refusal, before anything is fetched
            if entry.name in wanted:
                check_ids(entry, wanted[entry.name])
        return self.store.fetch(wanted)


def open_redis_tables(manifest: Manifest, url: str, name: str | None = None) -> TableLookups | None:
    """The bundle's tables over Redis (``url``: ``redis://…``), or None for a bundle without tables.
    The part files need not be present: the manifest's digests give the version, and the cluster
    must serve exactly it."""
    raw = manifest.data.get("tables") or []
    if not raw:
        return None
    parsed = parse_url(url)
    entries = tuple(TableEntry.from_json(t) for t in raw)
    for e in entries:
        if table_version(e, manifest.data["files"]) != e.version:
            raise TablesVersionError(f"table {e.name!r}: the manifest's part digests do not give the version it "
                                     "records", "the bundle was modified after build; rebuild it")
    version = check_version(entries, manifest.data["segments"])
    store = RedisTableStore(parsed, model_name(manifest, parsed, name), entries, version)
    return RedisLookups(entries, store, version)

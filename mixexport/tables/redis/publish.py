"""``mixexport publish``: put a bundle's tables into Redis Cluster, check them, then flip the pointer.

The steps, each safe to interrupt:

1. The bundle's part files are checked against the manifest's sha256 (the local store's checks).
2. The version's record ``{mx:M}:versions[V]`` is written with state ``publishing`` and the bucket
   layout (:mod:`~mixexport.tables.redis.keys`). Nothing serves it yet.
3. Every part streams into its buckets: pipelined ``HSET`` batches, every node's batch sent before
   any reply is read. After each part, the part is added to ``{mx:M}:done:<V16>``: a publish killed
   (even ``kill -9``) resumes at the first part not done.
4. Read-back: each node computes the SHA-1 of its buckets' rows, one digest per
   :data:`keys.DIGEST_ROWS` rows of a bucket (:data:`keys.DIGEST_SCRIPT`), and each must equal the
   digest of the same rows read from the verified part file; each bucket must hold exactly its rows
   (HLEN).
5. Only then one atomic script flips ``current`` (and ``previous``) and marks the record
   ``complete``. Until then the current version serves, untouched.

Publishing the version that is already current is a no-op; a complete version that is not current
is flipped back to (a rollback costs no upload). ``--gc`` drops every version that is neither
current nor previous once it has been so for :data:`GRACE_S` seconds: a reader that read an old
pointer has that long to finish (a request's deadline is milliseconds), and a fetch of a dropped
version is an error, never a wrong row. A write refused for memory (``OOM``) stops the publish with
Redis's reason, deletes what it wrote, and leaves the current version as it was.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixexport.errors import BadInputError, IntegrityError, StoreUnavailableError
from mixexport.tables.layout import TableEntry
from mixexport.tables.redis import keys as K
from mixexport.tables.redis.cluster import Cluster, ReplyError, pack
from mixexport.tables.redis.store import model_name, read_record
from mixexport.tables.redis.url import parse_url

GRACE_S = 300.0           # a version that is neither current nor previous stays readable this long
FLUSH_BYTES = 8 * 1024**2  # pipelined bytes per round trip while writing
CHUNK_ROWS = 4096          # fields per HSET
OP_TIMEOUT_S = 60.0        # one publish round trip (a node writing 8 MB, or hashing its buckets)


@dataclass
class PublishReport:
    """What a publish did (``mixexport publish --json`` prints it)."""

    model: str
    version: str
    store: str
    action: str                         # published | resumed | already current | flipped back
    rows: int = 0
    seconds: float = 0.0                # streaming the rows in
    rows_per_s: float = 0.0
    read_back_s: float = 0.0            # the digests computed by the nodes and compared
    flip_ms: float = 0.0
    previous: str | None = None
    buckets: int = 0
    payload_bytes_per_node: dict[str, int] = field(default_factory=dict)
    used_memory_per_node: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


class _Writer:
    """Per-node pipelines of packed commands, flushed as one parallel round trip."""

    def __init__(self, cluster: Cluster, on_error: Callable[[str, str], None]) -> None:
        self.cluster, self.on_error = cluster, on_error
        self.batches: dict[int, list[bytes]] = {}
        self.pending = 0

    def add(self, slot: int, cmd: bytes) -> None:
        self.batches.setdefault(int(self.cluster.owner[slot]), []).append(cmd)
        self.pending += len(cmd)
        if self.pending >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> dict[int, list[Any]]:
        if not self.batches:
            return {}
        batches, self.batches, self.pending = self.batches, {}, 0
        replies = self.cluster.roundtrip(batches, time.monotonic() + OP_TIMEOUT_S)
        for i, rs in replies.items():
            for r in rs:
                if isinstance(r, ReplyError):
                    self.on_error(str(self.cluster.nodes[i]), str(r))
        return replies


def _layout(entry: TableEntry, parts: list[Any], cluster: Cluster) -> dict[str, Any]:
    masters = [owned for _, owned in cluster.masters() if owned.size]
    vb = _value_bytes(entry)
    biggest = max((int(p["rows"]) for p in entry.parts), default=0) * vb
    subs = K.sub_buckets(biggest, entry.partitions, len(masters))
    slots = K.choose_slots(entry.partitions * subs, masters)
    return {"partitions": entry.partitions, "subs": subs, "slots": slots, "tags": K.tags_for_slots(slots),
            "value_bytes": vb, "dtype": entry.dtype, "dim": entry.dim, "rows": entry.rows}


def _value_bytes(entry: TableEntry) -> int:
    return entry.dim * np.dtype(entry.dtype).itemsize + (4 if entry.dtype == "int8" else 0)


def _values(rows: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored rows (+ float32 scale) as ``[n, value_bytes]`` uint8: what a hash field holds."""
    b = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
    return b if scale is None else np.concatenate([b, np.ascontiguousarray(scale, np.float32).view(np.uint8)
                                                   .reshape(-1, 4)], axis=1)


def _buckets_of_part(ids: np.ndarray, k: int, lay: dict[str, Any]) -> list[tuple[int, np.ndarray]]:
    """``(bucket, row positions)`` of part ``k``, positions ascending (so ids ascending)."""
    b = K.bucket_of(ids, lay["partitions"], lay["subs"])
    order = np.argsort(b, kind="stable")
    ub, starts = np.unique(b[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    return [(int(u), order[s:e]) for u, s, e in zip(ub, starts, bounds)]


def publish(bundle: str | Path, store: str, name: str | None = None, gc: bool = False, grace_s: float = GRACE_S,
            progress: Callable[[int, int], None] | None = None) -> PublishReport:
    """Publish ``bundle``'s tables to ``store`` (``redis://…``) under ``name`` and flip to them."""
    from mixexport.bundle import read_manifest
    from mixexport.tables.stores.local import open_tables

    url = parse_url(store)
    manifest = read_manifest(bundle)
    lookups = open_tables(manifest, verify_files=True)  # every part file against its sha256 first
    if lookups is None:
        raise BadInputError(f"bundle {bundle} has no tables to publish",
                            "build it with --passes ...,externalize-embeddings")
    model, version = model_name(manifest, url, name), lookups.version
    parts = lookups.store.parts  # type: ignore[attr-defined]
    cluster = Cluster(url.nodes, timeout=5.0)
    try:
        report = PublishReport(model, version, str(url), "published")
        current, record = read_record(cluster, model, version, time.monotonic() + OP_TIMEOUT_S)
        report.previous = current.decode() if current else None
        if record and record.get("state") == "complete":
            report.action = "already current"
            if current != version.encode():
                report.action = "flipped back"
                report.flip_ms = _flip(cluster, model, version, record)
        else:
            _upload(cluster, model, version, lookups.entries, parts, record, report, progress)
        if gc:
            report.dropped = collect_garbage(cluster, model, grace_s)
        return report
    finally:
        lookups.close()
        cluster.close()


def _upload(cluster: Cluster, model: str, version: str, entries: tuple[TableEntry, ...], parts: dict[str, Any],
            record: dict[str, Any] | None, report: PublishReport, progress: Callable[[int, int], None] | None) -> None:
    layouts = {e.name: _layout(e, parts[e.name], cluster) for e in entries}
    done_key = K.model_key(model, f"done:{version[:16]}")
    meta_node = int(cluster.owner[K.key_slot(K.model_key(model, "versions"))])
    done: set[str] = set()
    if record is not None and record.get("tables") == layouts:  # a killed publish of the same layout: resume
        (members,) = cluster.roundtrip({meta_node: [pack("SMEMBERS", done_key)]}, time.monotonic() + OP_TIMEOUT_S)[meta_node]
        done = {m.decode() for m in members} if isinstance(members, list) else set()
        report.action = "resumed"
    elif record is not None:  # another layout (the cluster changed): start over cleanly
        drop_version(cluster, model, version, record)
    new = {"state": "publishing", "tables": layouts, "created": time.time()}
    _meta(cluster, meta_node, [pack("HSET", K.model_key(model, "versions"), version, json.dumps(new))])

    def refuse(node: str, why: str) -> None:
        raise StoreUnavailableError(f"Redis node {node} refused the publish: {why}; the current version is "
                                    "untouched", "give the cluster more memory (maxmemory) or more masters, "
                                    "or drop old versions with --gc")

    total = sum(e.rows for e in entries)
    written, t0 = 0, time.perf_counter()
    expected: dict[tuple[str, int], tuple[np.ndarray, list[str]]] = {}
    try:
        writer = _Writer(cluster, refuse)
        for e in entries:
            lay = layouts[e.name]
            for k, (rows, ids, scale) in enumerate(parts[e.name]):
                skip = f"{e.name}/{k}" in done
                for b, pos in _buckets_of_part(ids, k, lay):
                    bids, values = ids[pos], _values(rows[pos], None if scale is None else scale[pos])
                    expected[(e.name, b)] = (bids, [hashlib.sha1(K.digest_body(bids[at:at + K.DIGEST_ROWS],
                                                                               values[at:at + K.DIGEST_ROWS])).hexdigest()
                                                    for at in range(0, len(bids), K.DIGEST_ROWS)])
                    key = K.bucket_key(model, version, e.name, lay["tags"][b])
                    for at in range(0, 0 if skip else len(pos), CHUNK_ROWS):
                        writer.add(lay["slots"][b], K.hset(key, bids[at:at + CHUNK_ROWS], values[at:at + CHUNK_ROWS]))
                    written += len(pos)
                    if progress:  # rows handed to the pipelines so far (a bucket at a time)
                        progress(written, total)
                writer.flush()
                _meta(cluster, meta_node, [pack("SADD", done_key, f"{e.name}/{k}")])
        report.rows, report.seconds = written, time.perf_counter() - t0
        report.rows_per_s = written / report.seconds if report.seconds else 0.0
        t1 = time.perf_counter()
        _read_back(cluster, model, version, layouts, expected)
        _wait_for_replicas(cluster)
        report.read_back_s = time.perf_counter() - t1
    except StoreUnavailableError as err:
        if "refused the publish" in err.message:  # out of memory: free what this version took
            drop_version(cluster, model, version, new)
        raise
    record = {**new, "state": "complete", "published": time.time()}
    report.flip_ms = _flip(cluster, model, version, record)
    _meta(cluster, meta_node, [pack("DEL", done_key)])
    report.buckets = sum(e.partitions * layouts[e.name]["subs"] for e in entries)
    for (t, b), (bids, _) in expected.items():
        node = str(cluster.nodes[int(cluster.owner[layouts[t]["slots"][b]])])
        report.payload_bytes_per_node[node] = report.payload_bytes_per_node.get(node, 0) + bids.size * (
            8 + layouts[t]["value_bytes"])
    report.used_memory_per_node = used_memory(cluster)


def _wait_for_replicas(cluster: Cluster) -> None:
    """Every master's replicas hold what this publish wrote (``WAIT``) before the flip: a replica
    promoted after its master dies must serve the new version whole, not a part of it."""
    # each master's own count: CLUSTER SLOTS leaves out replicas that have not replicated anything yet
    infos = cluster.roundtrip({i: [pack("INFO", "replication")] for i in range(len(cluster.nodes))},
                              time.monotonic() + OP_TIMEOUT_S)
    replicas = {i: _connected_replicas(info) for i, (info,) in infos.items()}
    batches = {i: [pack("WAIT", n, int(OP_TIMEOUT_S * 1000))] for i, n in replicas.items() if n}
    if not batches:
        return
    for i, (acked,) in cluster.roundtrip(batches, time.monotonic() + OP_TIMEOUT_S + 5).items():
        if isinstance(acked, ReplyError) or int(acked) < replicas[i]:
            raise StoreUnavailableError(f"Redis node {cluster.nodes[i]}: {acked} of its {replicas[i]} replicas "
                                        f"acknowledged the publish within {OP_TIMEOUT_S:g} s; not flipped, the "
                                        "current version is untouched", "check the replicas' links, then publish again")


def _connected_replicas(info: Any) -> int:
    """``connected_slaves`` of an ``INFO replication`` reply (0 when absent or an error)."""
    if isinstance(info, bytes):
        for line in info.decode(errors="replace").splitlines():
            if line.startswith("connected_slaves:"):
                return int(line.split(":", 1)[1])
    return 0


def _meta(cluster: Cluster, node: int, cmds: list[bytes]) -> list[Any]:
    out = cluster.roundtrip({node: cmds}, time.monotonic() + OP_TIMEOUT_S)[node]
    for r in out:
        if isinstance(r, ReplyError):
            raise StoreUnavailableError(f"Redis node {cluster.nodes[node]} refused a write: {r}; the current "
                                        "version is untouched", "check the cluster's memory and health")
    return out


def _read_back(cluster: Cluster, model: str, version: str, layouts: dict[str, Any],
               expected: dict[tuple[str, int], tuple[np.ndarray, list[str]]]) -> None:
    """Every bucket's row count and chunk digests, computed by its node, against the verified part file's."""
    batches: dict[int, list[bytes]] = {}
    want: dict[int, list[tuple[str, int, int | str]]] = {}  # per node, per command: (table, bucket, expected)
    for (t, b), (bids, digests) in expected.items():
        node = int(cluster.owner[layouts[t]["slots"][b]])
        key = K.bucket_key(model, version, t, layouts[t]["tags"][b])
        batches.setdefault(node, []).append(pack("HLEN", key))
        want.setdefault(node, []).append((t, b, bids.size))
        for i, at in enumerate(range(0, bids.size, K.DIGEST_ROWS)):
            batches[node].append(K.digest_command(key, bids[at:at + K.DIGEST_ROWS]))
            want[node].append((t, b, digests[i]))
        if len(batches[node]) > 256:  # a round trip of bounded size
            _check_digests(cluster, cluster.roundtrip({node: batches.pop(node)}, time.monotonic() + OP_TIMEOUT_S),
                           {node: want.pop(node)})
    _check_digests(cluster, cluster.roundtrip(batches, time.monotonic() + OP_TIMEOUT_S), want)


def _check_digests(cluster: Cluster, replies: dict[int, list[Any]],
                   want: dict[int, list[tuple[str, int, int | str]]]) -> None:
    bad = []
    for node, rs in replies.items():
        for (t, b, expect), r in zip(want[node], rs):
            if isinstance(r, ReplyError):
                raise StoreUnavailableError(f"Redis node {cluster.nodes[node]} refused the read-back: {r}; not "
                                            "flipped, the current version is untouched", "publish again")
            got = r if isinstance(r, int) else r[1].decode() or f"a missing row after {int(r[0])}"
            if got != expect:
                bad.append(f"{t} bucket {b} on {cluster.nodes[node]}: found {got}, expected {expect}")
    if bad:
        raise IntegrityError(f"{len(bad)} bucket(s) read back differ from the bundle's part files ({bad[0]}); "
                             "not flipped, the current version is untouched", "publish again")


def _flip(cluster: Cluster, model: str, version: str, record: dict[str, Any]) -> float:
    """The atomic pointer flip; its wall time in ms."""
    node = int(cluster.owner[K.key_slot(K.model_key(model, "current"))])
    now = str(time.time())
    cmd = pack("EVAL", K.FLIP_SCRIPT, 4, K.model_key(model, "current"), K.model_key(model, "previous"),
               K.model_key(model, "versions"), K.model_key(model, "retired"), version, json.dumps(record), now)
    t0 = time.perf_counter()
    _meta(cluster, node, [cmd])
    return (time.perf_counter() - t0) * 1000


def drop_version(cluster: Cluster, model: str, version: str, record: dict[str, Any]) -> None:
    """Delete a version's buckets and its record (never the current version: the caller checks)."""
    batches: dict[int, list[bytes]] = {}
    for t, lay in (record.get("tables") or {}).items():
        for tag, slot in zip(lay["tags"], lay["slots"]):
            batches.setdefault(int(cluster.owner[slot]), []).append(pack("UNLINK", K.bucket_key(model, version, t, tag)))
    cluster.roundtrip(batches, time.monotonic() + OP_TIMEOUT_S)
    node = int(cluster.owner[K.key_slot(K.model_key(model, "versions"))])
    _meta(cluster, node, [pack("HDEL", K.model_key(model, "versions"), version),
                          pack("HDEL", K.model_key(model, "retired"), version),
                          pack("DEL", K.model_key(model, f"done:{version[:16]}"))])


def collect_garbage(cluster: Cluster, model: str, grace_s: float = GRACE_S) -> list[str]:
    """Drop the versions that are neither current nor previous, once past the grace period
    (unfinished publishes count from their start). Returns the dropped versions."""
    node = int(cluster.owner[K.key_slot(K.model_key(model, "versions"))])
    cur, prev, versions, retired = _meta(cluster, node, [
        pack("GET", K.model_key(model, "current")), pack("GET", K.model_key(model, "previous")),
        pack("HGETALL", K.model_key(model, "versions")), pack("HGETALL", K.model_key(model, "retired"))])
    records = {versions[i].decode(): json.loads(versions[i + 1]) for i in range(0, len(versions), 2)}
    since = {retired[i].decode(): float(retired[i + 1]) for i in range(0, len(retired), 2)}
    keep = {v.decode() for v in (cur, prev) if v}
    dropped, now = [], time.time()
    for v, rec in records.items():
        start = since.get(v, rec.get("published") or rec.get("created") or 0.0)
        if v not in keep and now - float(start) >= grace_s:
            drop_version(cluster, model, v, rec)
            dropped.append(v)
    return dropped


def used_memory(cluster: Cluster) -> dict[str, int]:
    """``used_memory`` of every master (INFO memory)."""
    out = {}
    for i, node in enumerate(cluster.nodes):
        (info,) = cluster.roundtrip({i: [pack("INFO", "memory")]}, time.monotonic() + OP_TIMEOUT_S)[i]
        if isinstance(info, bytes):
            for line in info.decode().splitlines():
                if line.startswith("used_memory:"):
                    out[str(node)] = int(line.split(":")[1])
    return out

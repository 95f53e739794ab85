"""The key layout of published tables, and the RESP packing of lookups and writes with numpy.

Per model ``M`` (all in one slot, so that the pointer flip is one atomic script):

- ``{mx:M}:current`` / ``{mx:M}:previous``: the served ``tables_version`` and the one before it;
- ``{mx:M}:versions``: hash, version → JSON (state, per-table bucket layout, dates);
- ``{mx:M}:done:<version16>``: set of the parts a running publish has written (resume).

Rows: table ``T`` of version ``V`` is cut into buckets; bucket ``b`` is one hash
``mx:M:<V[:16]>:T:{<tag_b>}`` (field: the id as 8 big-endian bytes, value: the stored row bytes,
then for int8 rows the float32 scale). All of a bucket's keys share its hash tag, so a bucket sits in
one slot and is read with one HMGET. Buckets nest in the bundle's partitions: id ``i`` with hash
``h = splitmix64(i)`` is in partition ``k = h % P`` and sub-bucket ``s = (h // P) % S``, bucket
``k·S + s`` — so a publish streams one part file at a time and each bucket's digest is computed from
one verified part file.

Balance: the tags are chosen by slot, not by name: bucket ``b`` goes to master ``b % M`` (masters in
slot order) and to an evenly spaced slot among that master's slots, so every master holds the same
number of buckets (±1) whatever the slot ranges are. The number of buckets per table is at least
:data:`BUCKETS_PER_MASTER` per master, and more for big tables (:data:`BUCKET_BYTES` each at most).

Measured (docs/tables.md): per-bucket hashes read with HMGET vs per-id keys read with MGET grouped
by slot; hashes are the layout (see ``benchmarks/table_store.py``).
"""

from __future__ import annotations

import binascii
import functools
import math

import numpy as np


SLOTS = 16384
# Few buckets: a request sends one HMGET per bucket it touches, and each costs client and server
# time; balance does not need many (the tags put the same number on every master, and ids hash
# evenly into buckets). A bucket's size is bounded because its read-back digest runs in one script.
BUCKETS_PER_MASTER = 4
BUCKET_BYTES = 16 * 1024**2
_FIELD = b"$8\r\n"           # every field is an 8-byte id
_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def key_slot(key: bytes) -> int:
    """Redis Cluster's slot of a key: CRC16-XMODEM (``binascii.crc_hqx``) of its hash tag, mod 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return binascii.crc_hqx(key, 0) % SLOTS


@functools.lru_cache(maxsize=1)
def _first_tags() -> tuple[str, ...]:
    """The first 6-digit tag of every slot (about 170k CRCs, once per process)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < SLOTS:
        tag = f"{i:06d}"
        found.setdefault(binascii.crc_hqx(tag.encode(), 0) % SLOTS, tag)
        i += 1
    return tuple(found[s] for s in range(SLOTS))


def tags_for_slots(slots: list[int]) -> list[str]:
    """For each wanted slot, a short tag (6 digits) whose slot it is."""
    tags = _first_tags()
    return [tags[s] for s in slots]


def sub_buckets(nbytes_per_part: int, partitions: int, masters: int) -> int:
    """Buckets per partition: enough for :data:`BUCKETS_PER_MASTER` per master over the table,
    and for no bucket to pass :data:`BUCKET_BYTES`."""
    by_balance = math.ceil(BUCKETS_PER_MASTER * max(masters, 1) / partitions)
    by_size = math.ceil(nbytes_per_part / BUCKET_BYTES)
    return int(max(1, by_balance, by_size))


def choose_slots(buckets: int, masters: list[np.ndarray]) -> list[int]:
    """The slot of every bucket: bucket ``b`` on master ``b % M``, evenly spaced in its slots."""
    m = len(masters)
    per = [math.ceil((buckets - j) / m) for j in range(m)]
    out = []
    for b in range(buckets):
        owned, n = masters[b % m], per[b % m]
        out.append(int(owned[(b // m) * len(owned) // n]))
    return out


def bucket_of(ids: np.ndarray, partitions: int, subs: int) -> np.ndarray:
    """The bucket (int64) of every id: partition ``h % P`` times ``S`` plus ``(h // P) % S``,
    ``h = splitmix64(id)``. A request's lookup calls this once per table, so it is
    :func:`~mixexport.tables.layout.splitmix64` computed in place on one array (the same
    numbers: integer arrays wrap silently, no ``errstate`` needed), with ``P = 1`` (one
    partition) skipping its divisions."""
    h = np.add(np.asarray(ids, dtype=np.int64).view(np.uint64), _C1)
    h ^= h >> _S30
    h *= _C2
    h ^= h >> _S27
    h *= _C3
    h ^= h >> _S31
    if partitions == 1:
        h %= np.uint64(subs)
        return h.view(np.int64)
    p = np.uint64(partitions)
    return ((h % p) * np.uint64(subs) + (h // p) % np.uint64(subs)).view(np.int64)


#: tables of up to this many rows get every row's bucket computed once, when a store opens (a byte a
#: row for up to 256 buckets, 16 MiB at most): a request then buckets its ids with one ``take``
#: instead of :func:`bucket_of`'s eleven numpy calls (~10 µs of a 1×256 fetch's client CPU)
BUCKET_TABLE_ROWS = 1 << 24


def bucket_table(rows: int, partitions: int, subs: int) -> np.ndarray | None:
    """Row ``i``'s bucket at ``[i]`` (uint8, or uint16 past 256 buckets) for a table of ``rows``
    rows; None past :data:`BUCKET_TABLE_ROWS` rows or 65,536 buckets (:func:`bucket_of` then)."""
    buckets = partitions * subs
    if rows > BUCKET_TABLE_ROWS or buckets > 1 << 16:
        return None
    out = np.empty(rows, dtype=np.uint8 if buckets <= 1 << 8 else np.uint16)
    step = 1 << 20
    for at in range(0, rows, step):
        out[at:at + step] = bucket_of(np.arange(at, min(at + step, rows), dtype=np.int64), partitions, subs)
    return out


def bucket_key(model: str, version: str, table: str, tag: str) -> bytes:
    return f"mx:{model}:{version[:16]}:{table}:{{{tag}}}".encode()


def model_key(model: str, what: str) -> bytes:
    """``{mx:M}:current`` and friends: one slot for everything the flip touches."""
    return f"{{mx:{model}}}:{what}".encode()


def fields(ids: np.ndarray) -> np.ndarray:
    """Every id as an 8-byte big-endian field (ascending ids give ascending fields), ``[n, 8]`` uint8."""
    return np.ascontiguousarray(ids, dtype=">i8").view(np.uint8).reshape(-1, 8)


_BULKS = np.tile(np.frombuffer(_FIELD + bytes(8) + b"\r\n", np.uint8), (1024, 1))  # HMGET fields' frames


def field_bulks(ids: np.ndarray) -> np.ndarray:
    """``$8\\r\\n<id>\\r\\n`` for every id, ``[n, 14]`` uint8: the arguments of an HMGET, with no
    Python work per id (two numpy calls for up to 1,024 ids: copy the frames, write the ids into
    them big-endian)."""
    global _BULKS
    if ids.size > len(_BULKS):
        _BULKS = np.tile(_BULKS[0], (ids.size, 1))
    out = _BULKS[:ids.size].copy()
    out[:, 4:12].view(">i8")[:, 0] = ids
    return out


def hmget_header(key: bytes, n: int) -> bytes:
    return b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n%s\r\n" % (n + 2, len(key), key)


def hmget_template(key: bytes) -> bytes:
    """:func:`hmget_header` of ``key`` as a template for ``% (n + 2)`` (one formatting per
    command on the lookup path)."""
    return b"*%%d\r\n$5\r\nHMGET\r\n$%d\r\n%s\r\n" % (len(key), key.replace(b"%", b"%%"))


def hset(key: bytes, ids: np.ndarray, values: np.ndarray) -> bytes:
    """``HSET key id value …`` for ``values`` ``[n, vb]`` uint8, packed with numpy."""
    n, vb = values.shape
    head = b"$%d\r\n" % vb
    pair = np.empty((n, 14 + len(head) + vb + 2), dtype=np.uint8)
    pair[:, :14] = field_bulks(ids)
    pair[:, 14:14 + len(head)] = np.frombuffer(head, np.uint8)
    pair[:, 14 + len(head):-2] = values
    pair[:, -2:] = np.frombuffer(b"\r\n", np.uint8)
    return b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n" % (2 * n + 2, len(key), key) + pair.tobytes()


def digest_body(ids: np.ndarray, values: np.ndarray) -> bytes:
    """What a bucket's digest is the SHA-1 of: for every id in ascending order, its 8-byte field
    then its value (:data:`DIGEST_SCRIPT` computes the same on the node)."""
    return np.concatenate([fields(ids), values], axis=1).tobytes()


#: rows per read-back digest: a script over this many rows runs for milliseconds (a script blocks
#: its node; one over a whole 16 MiB bucket, under load, got the node marked failing: CLUSTERDOWN),
#: and Lua's unpack takes this many arguments
DIGEST_ROWS = 4000

#: the read-back digest of one chunk of a bucket, computed by the node over the ids the publisher
#: sent (ARGV, ascending): {rows found before the first missing one, SHA-1 of field+value pairs}
DIGEST_SCRIPT = b"""
local vals = redis.call('HMGET', KEYS[1], unpack(ARGV))
local body = {}
for k = 1, #vals do
  if not vals[k] then return {k - 1, ''} end
  body[#body + 1] = ARGV[k]
  body[#body + 1] = vals[k]
end
return {#vals, redis.sha1hex(table.concat(body))}
"""


def digest_command(key: bytes, ids: np.ndarray) -> bytes:
    """``EVAL DIGEST_SCRIPT 1 key id…`` packed with numpy."""
    head = b"*%d\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n1\r\n$%d\r\n%s\r\n" % (
        ids.size + 4, len(DIGEST_SCRIPT), DIGEST_SCRIPT, len(key), key)
    return head + field_bulks(ids).tobytes()


#: the pointer flip, atomic (every key in one slot): current -> previous, new -> current; the
#: version that stops being current or previous gets its retirement time (for --gc's grace period)
FLIP_SCRIPT = b"""
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return cur end
local prev = redis.call('GET', KEYS[2])
if cur then redis.call('SET', KEYS[2], cur) end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if prev and prev ~= ARGV[1] then redis.call('HSET', KEYS[4], prev, ARGV[3]) end
redis.call('HDEL', KEYS[4], ARGV[1])
return cur or ''
"""

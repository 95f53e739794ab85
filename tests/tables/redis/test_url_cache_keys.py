"""The parts of the redis store that need no server: URL parsing, the row cache (never a wrong row,
bounded bytes), the RESP packing and the slot of a key (Redis's own test vectors)."""

from __future__ import annotations

import numpy as np
import pytest

from mixexport.errors import BadInputError
from mixexport.tables.redis import keys as K
from mixexport.tables.redis.cache import RowCache
from mixexport.tables.redis.url import parse_url

hiredis = pytest.importorskip("hiredis")  # the redis extra


def test_store_urls() -> None:
    u = parse_url("redis://127.0.0.1:7001,localhost:7002?name=m1&deadline_ms=20&cache_bytes=0")
    assert u.nodes == (("127.0.0.1", 7001), ("localhost", 7002)) and u.name == "m1"
    assert u.deadline_s == pytest.approx(0.02) and u.cache_bytes == 0 and str(u).count(",") == 1
    for bad, why in (("http://h:1", "not a redis:// URL"), ("redis://h", "is not HOST:PORT"),
                     ("redis://h:99999", "is not HOST:PORT"), ("redis://h:1?deadline_ms=-1", "deadline_ms"),
                     ("redis://h:1?name=1x", "name"), ("redis://h:1?colour=red", "unknown option")):
        with pytest.raises(BadInputError, match=why):
            parse_url(bad)


def test_key_slots_match_redis() -> None:
    # CLUSTER KEYSLOT values from the Redis Cluster specification and redis-cli
    assert K.key_slot(b"123456789") == 12739
    assert K.key_slot(b"{user1000}.following") == K.key_slot(b"{user1000}.followers") == K.key_slot(b"user1000")
    assert K.key_slot(b"foo{}{bar}") == K.key_slot(b"foo{}{bar}")  # an empty tag hashes the whole key
    assert K.key_slot(b"foo") == 12182


def test_packed_commands_parse_as_resp() -> None:
    ids = np.array([0, 1, 2**40 + 7], dtype=np.int64)
    values = np.arange(3 * 5, dtype=np.uint8).reshape(3, 5)
    cmd = K.hset(b"k{t}", ids, values)
    # a RESP request is an array of bulk strings: parse it back with hiredis
    reader = hiredis.Reader()
    reader.feed(cmd)
    parts = reader.gets()
    assert parts[:2] == [b"HSET", b"k{t}"] and len(parts) == 2 + 2 * 3
    assert [int.from_bytes(p, "big") for p in parts[2::2]] == ids.tolist()
    assert parts[3::2] == [bytes(v) for v in values]
    reader.feed(K.hmget_header(b"k{t}", 3) + K.field_bulks(ids).tobytes())
    assert reader.gets() == [b"HMGET", b"k{t}", *parts[2::2]]


def test_the_row_cache_never_returns_a_wrong_row() -> None:
    rng = np.random.default_rng(0)
    table = rng.integers(0, 255, size=(5000, 16), dtype=np.uint8)
    cache = RowCache(16, 64 * 1024)
    assert cache.nbytes <= 64 * 1024
    for _ in range(300):
        ids = np.unique(rng.zipf(1.3, 80) % 5000).astype(np.int64)
        miss, rows, slots = cache.lookup(ids)
        hit = np.ones(ids.size, bool)
        hit[miss] = False
        assert np.array_equal(rows[hit], table[ids[hit]])
        # ids that share a slot within one insert: one of them is kept, key and row together
        cache.insert(ids[~hit], table[ids[~hit]], slots[~hit])
        keys = cache.records[:, :8].view(np.int64)[:, 0]
        held = keys >= 0
        assert np.array_equal(cache.records[held, 8:], table[keys[held]])
    assert 0.3 < cache.hit_rate < 1
    off = RowCache(16, 0)
    miss, rows, slots = off.lookup(np.arange(10))
    assert np.array_equal(miss, np.arange(10)) and rows.shape == (10, 16) and off.records.shape == (0, 24)
    off.insert(np.arange(10), table[:10], slots)


def test_the_lookup_paths_fast_forms_equal_the_rules() -> None:
    """The store's lookup path computes buckets with an in-place splitmix64 and decodes float16
    rows by table lookup: both must give exactly the layout rule's buckets and numpy's cast, on
    every float16 bit pattern and on ids across the whole int64 range."""
    from mixexport.tables.layout import splitmix64
    from mixexport.tables.redis.store import _f16_to_f32

    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = codes.view(np.float16).astype(np.float32)
    assert np.array_equal(_f16_to_f32().take(codes).view(np.uint32), want.view(np.uint32))  # NaNs too
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(-2**63, 2**63 - 1, 5000), [0, 1, -1, 2**63 - 1, -2**63]]).astype(np.int64)
    for partitions, subs in ((1, 12), (16, 1), (7, 3), (1024, 5)):
        h = splitmix64(ids)
        rule = (h % np.uint64(partitions)) * np.uint64(subs) + (h // np.uint64(partitions)) % np.uint64(subs)
        assert np.array_equal(K.bucket_of(ids, partitions, subs), rule.astype(np.int64))
    rows = (1 << 20) + 7  # the bucket table is computed a million rows at a time
    table = K.bucket_table(rows, 7, 3)
    assert table.dtype == np.uint8 and np.array_equal(table, K.bucket_of(np.arange(rows), 7, 3))
    assert K.bucket_table(1000, 1024, 5).dtype == np.uint16
    assert K.bucket_table(K.BUCKET_TABLE_ROWS + 1, 1, 12) is None and K.bucket_table(10, 1 << 16, 2) is None
    some = ids[::97]
    assert K.field_bulks(some).tobytes() == b"".join(b"$8\r\n" + int(i).to_bytes(8, "big", signed=True) + b"\r\n"
                                                     for i in some)

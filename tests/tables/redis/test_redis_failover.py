"""A master killed (kill -9) while scoring: a clear error within the deadline without replicas,
success after the replica is promoted with them — never a wrong or zero row. Each test gets its own
cluster (a killed node does not come back)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from mixexport.errors import StoreUnavailableError
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.tables.redis.publish import publish
from tests.tables.redis.cluster import RedisCluster
from tests.tables.redis.conftest import _need_redis

pytestmark = pytest.mark.xdist_group("redis")
DEADLINE_MS = 400


@pytest.fixture
def fresh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisCluster]:
    _need_redis()
    c = RedisCluster(tmp_path / "redis", replicas=request.param).start()
    try:
        yield c
    finally:
        c.stop()


def _setup(cluster: RedisCluster, bundle: Path, tiny_ckpt: Path) -> tuple[Runtime, list, list]:
    publish(bundle, cluster.url)
    source = load_source(tiny_ckpt)
    requests = [source.example_request(1, 64, seed=s) for s in range(4)]
    with Runtime.open(bundle) as local:
        want = [local.score(r) for r in requests]
    rt = Runtime.open(bundle, tables=f"{cluster.url}?deadline_ms={DEADLINE_MS}&cache_bytes=0")
    for r, w in zip(requests, want):
        got = rt.score(r)
        assert all(np.array_equal(got[k], w[k]) for k in w)
    return rt, requests, want


@pytest.mark.parametrize("fresh", [0], indirect=True, ids=["no-replicas"])
def test_a_killed_master_without_replicas_is_a_clear_error(fresh: RedisCluster, ext_bundles,
                                                           tiny_ckpt: Path) -> None:
    rt, requests, _ = _setup(fresh, ext_bundles[0], tiny_ckpt)
    try:
        fresh.kill(fresh.masters_ports[1])
        for r in requests:  # 64 candidates over 12 buckets a table: every request needs the dead master
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailableError, match=r"Redis node 127\.0\.0\.1:\d+ is unreachable|"
                                                            r"did not answer within the deadline") as e:
                rt.score(r)
            assert time.monotonic() - t0 < DEADLINE_MS / 1000 + 0.5
            assert "\n" not in e.value.message
    finally:
        rt.close()


@pytest.mark.parametrize("fresh", [1], indirect=True, ids=["with-replicas"])
def test_a_killed_master_with_replicas_fails_over(fresh: RedisCluster, ext_bundles, tiny_ckpt: Path) -> None:
    rt, requests, want = _setup(fresh, ext_bundles[0], tiny_ckpt)
    errors, served_after = 0, 0
    try:
        fresh.kill(fresh.masters_ports[0])
        end = time.monotonic() + 30  # promotion takes ~1.6-2.4 x cluster-node-timeout (500 ms) + ~1 s
        i = 0
        while served_after < 20 and time.monotonic() < end:
            try:
                got = rt.score(requests[i % len(requests)])
            except StoreUnavailableError:
                errors += 1
                time.sleep(0.02)
                continue
            w = want[i % len(requests)]
            assert all(np.array_equal(got[k], w[k]) for k in w), "a wrong row after the kill"
            served_after += 1
            i += 1
    finally:
        rt.close()
    assert served_after == 20, f"no failover within 30 s ({errors} errors)"
    assert errors > 0  # the outage was seen as errors, not as rows

"""The redis table store against a real 3-master cluster: exactly the local store's scores, the
version bound to the bundle, a flip under a scoring loop, refusals in one line. Each test publishes
under its own model name, so the tests share one cluster without depending on each other."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mixexport.errors import BadInputError, StoreTimeoutError, StoreUnavailableError, TablesVersionError
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.tables.redis import keys as K
from mixexport.tables.redis.cluster import Cluster
from mixexport.tables.redis.publish import collect_garbage, drop_version, publish
from mixexport.tables.redis.store import read_record
from tests.cli_helpers import run_cli
from tests.tables.redis.cluster import RedisCluster, cli, free_ports

pytestmark = pytest.mark.xdist_group("redis")
SLOW = "deadline_ms=5000"  # two shared cores: the tests check behaviour, the benchmark checks time


def _requests(tiny_ckpt: Path) -> list:
    source = load_source(tiny_ckpt)
    return [source.example_request(1, 64, seed=3), source.example_request(3, 20, seed=4)]


def _url(cluster: RedisCluster, name: str, extra: str = SLOW) -> str:
    return f"{cluster.url}?name={name}&{extra}"


def _local_scores(bundle: Path, requests: list) -> list[dict[str, np.ndarray]]:
    with Runtime.open(bundle) as rt:
        return [rt.score(r) for r in requests]


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_redis_scores_are_the_local_scores(cluster: RedisCluster, ext_bundles, tiny_ckpt: Path) -> None:
    requests = _requests(tiny_ckpt)
    for i, bundle in enumerate(ext_bundles):  # fp32 rows, then int8 rows + scale
        report = publish(bundle, cluster.url, name=f"same{i}")
        assert report.action == "published" and report.rows == sum(
            t["rows"] for t in json.loads((bundle / "manifest.json").read_text())["tables"])
        assert len(report.payload_bytes_per_node) == 3  # every master holds buckets
        assert report.buckets % 3 == 0 and report.flip_ms > 0
        with Runtime.open(bundle, tables=_url(cluster, f"same{i}")) as red:
            assert red.tables.store.name == "redis"
            for request, want in zip(requests, _local_scores(bundle, requests)):
                for _ in range(2):  # cold, then from the row cache
                    got = red.score(request)
                    for k in want:
                        assert np.abs(got[k] - want[k]).max() == 0, k
            stats = red.tables.store.cache_stats()
            assert all(0 < s["hit_rate"] < 1 for s in stats.values()), stats
        assert publish(bundle, cluster.url, name=f"same{i}").action == "already current"


def test_buckets_are_balanced_over_the_masters(cluster: RedisCluster) -> None:
    c = Cluster([("127.0.0.1", p) for p in cluster.ports[:1]])
    try:
        for buckets in (48, 96, 300):
            slots = K.choose_slots(buckets, [owned for _, owned in c.masters()])
            per = np.bincount(c.owner[slots], minlength=3)
            assert per.max() - per.min() <= 1, per
            tags = K.tags_for_slots(slots)
            assert [K.key_slot(K.bucket_key("m", "v" * 64, "t", tag)) for tag in tags] == slots
    finally:
        c.close()


def test_a_version_mismatch_is_refused_naming_both(cluster: RedisCluster, ext_bundles, tiny_ckpt: Path) -> None:
    fp32, int8 = ext_bundles
    publish(fp32, cluster.url, name="mismatch")
    request = _requests(tiny_ckpt)[0]
    with Runtime.open(fp32, tables=_url(cluster, "mismatch")) as rt:
        rt.score(request)
        publish(int8, cluster.url, name="mismatch")  # the pointer moves: re-read with the next request
        with pytest.raises(TablesVersionError, match=r"Redis serves tables_version [0-9a-f]{16}… .* built with "
                                                     r"[0-9a-f]{16}…") as e:
            rt.score(request)
        assert "\n" not in e.value.message
    with pytest.raises(TablesVersionError, match="is not published"):
        Runtime.open(fp32, tables=_url(cluster, "never_published"))
    r = run_cli("verify", str(fp32), "--no-metrics", "--tables", _url(cluster, "mismatch"))
    assert r.code == 1 and "Redis serves tables_version" in r.err and "Traceback" not in r.err


def test_a_flip_under_a_scoring_loop_mixes_nothing(cluster: RedisCluster, ext_bundles, tiny_ckpt: Path) -> None:
    """A server holding both bundles scores with the one the pointer names: a request refused for
    the version it raced is retried with the other bundle. 0 failed requests, and every score is
    exactly one version's local score (rows of two versions would match neither)."""
    fp32, int8 = ext_bundles
    requests = _requests(tiny_ckpt)
    want = {0: _local_scores(fp32, requests), 1: _local_scores(int8, requests)}
    publish(int8, cluster.url, name="flip")
    publish(fp32, cluster.url, name="flip")  # current fp32, int8 published and kept as previous
    rts = [Runtime.open(b, tables=_url(cluster, "flip")) for b in (fp32, int8)]
    served, failed, stop = {0: 0, 1: 0}, [], threading.Event()

    def loop() -> None:
        at, i = 0, 0
        while not stop.is_set() or i < 20:
            request = i % len(requests)
            for attempt in range(2):
                try:
                    got = rts[at].score(requests[request])
                except TablesVersionError:
                    at = 1 - at  # the pointer moved: the other bundle
                    continue
                if not _same(got, want[at][request]):
                    failed.append(f"request {i}: not the scores of version {at}")
                served[at] += 1
                break
            else:
                failed.append(f"request {i}: refused by both bundles")
            i += 1

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        time.sleep(0.3)
        for _ in range(3):  # fp32 -> int8 -> fp32 -> int8: flips of published versions
            for b in (int8, fp32):
                publish(b, cluster.url, name="flip")
                time.sleep(0.1)
    finally:
        stop.set()
        thread.join(60)
        for rt in rts:
            rt.close()
    assert failed == [] and served[0] > 0 and served[1] > 0, (failed[:3], served)


def test_an_unknown_id_is_the_local_stores_error(cluster: RedisCluster, ext_bundles, tiny_ckpt: Path) -> None:
    fp32 = ext_bundles[0]
    publish(fp32, cluster.url, name="unknown")
    request = _requests(tiny_ckpt)[0]
    request.item["item_cat"][[2, 5], 0] = 10_000
    messages = []
    for tables in (None, _url(cluster, "unknown")):
        with Runtime.open(fp32, tables=tables) as rt:
            with pytest.raises(BadInputError) as e:
                rt.score(request, validate=False)
            messages.append(e.value.message)
    assert messages[0] == messages[1] and "1 of" in messages[0]


def test_a_dropped_version_is_an_error_not_a_row(cluster: RedisCluster, ext_bundles, tiny_ckpt: Path) -> None:
    """The reader's race: it read the pointer, and the version is dropped before its fetch."""
    fp32, int8 = ext_bundles
    publish(fp32, cluster.url, name="dropped")
    request = _requests(tiny_ckpt)[0]
    with Runtime.open(fp32, tables=_url(cluster, "dropped", SLOW + "&cache_bytes=0")) as rt:
        rt.score(request)
        c = Cluster([("127.0.0.1", cluster.ports[0])])
        try:
            version = rt.tables.version
            _, record = read_record(c, "dropped", version, time.monotonic() + 5)
            drop_version(c, "dropped", version, record)  # what --gc does, here while still current
        finally:
            c.close()
        with pytest.raises(TablesVersionError, match="rows of tables_version .* are missing from the cluster"):
            rt.score(request)


def test_gc_keeps_current_and_previous_and_drops_the_rest(cluster: RedisCluster, ext_bundles) -> None:
    fp32, int8 = ext_bundles
    publish(fp32, cluster.url, name="gc")
    publish(int8, cluster.url, name="gc")
    c = Cluster([("127.0.0.1", cluster.ports[0])])
    try:
        assert collect_garbage(c, "gc", grace_s=0) == []  # current and previous stay
        # an unfinished publish of a third version (its record only): dropped after the grace period
        node = int(c.owner[K.key_slot(K.model_key("gc", "versions"))])
        from mixexport.tables.redis.cluster import pack

        c.roundtrip({node: [pack("HSET", K.model_key("gc", "versions"), "f" * 64,
                                 json.dumps({"state": "publishing", "tables": {}, "created": time.time()}))]},
                    time.monotonic() + 5)
        assert collect_garbage(c, "gc", grace_s=3600) == []
        assert collect_garbage(c, "gc", grace_s=0) == ["f" * 64]
    finally:
        c.close()


def test_a_hung_node_fails_within_the_deadline(cluster: RedisCluster, ext_bundles, tiny_ckpt: Path) -> None:
    fp32 = ext_bundles[0]
    publish(fp32, cluster.url, name="hung")
    request = _requests(tiny_ckpt)[0]
    with Runtime.open(fp32, tables=_url(cluster, "hung", "deadline_ms=300&cache_bytes=0")) as rt:
        rt.score(request)
        cluster.kill(cluster.ports[1], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreTimeoutError, match="did not answer within the deadline"):
                rt.score(request)
            assert time.monotonic() - t0 < 0.3 + 0.5
        finally:
            cluster.kill(cluster.ports[1], signal.SIGCONT)
        deadline = time.monotonic() + 10
        while True:  # the node answers again: so does the store (a new connection)
            try:
                rt.score(request)
                break
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_connection_refused_is_exit_3(ext_bundles) -> None:
    port = free_ports(1)[0]
    r = run_cli("publish", str(ext_bundles[0]), "--store", f"redis://127.0.0.1:{port}")
    assert r.code == 3 and "connection refused" in r.err and "Traceback" not in r.err, r.err
    with pytest.raises(StoreUnavailableError, match="connection refused"):
        Runtime.open(ext_bundles[0], tables=f"redis://127.0.0.1:{port}")
    r = run_cli("publish", str(ext_bundles[0]), "--store", "redis://nohostport")
    assert r.code == 2 and "is not HOST:PORT" in r.err


def test_a_publish_out_of_memory_fails_and_leaves_current(cluster: RedisCluster, ext_bundles,
                                                          tiny_ckpt: Path) -> None:
    fp32, int8 = ext_bundles
    publish(fp32, cluster.url, name="oom")
    request = _requests(tiny_ckpt)[0]
    want = _local_scores(fp32, [request])[0]
    masters = cluster.ports[:3]
    try:
        for p in masters:  # just above what each node uses now: the next version cannot fit
            used = int(cli(p, "INFO", "memory").split("used_memory:")[1].split()[0])
            cli(p, "CONFIG", "SET", "maxmemory", str(used + 4096))
        r = run_cli("publish", str(int8), "--store", cluster.url, "--name", "oom")
        assert r.code == 3 and "OOM" in r.err and "current version is untouched" in r.err, r.err
    finally:
        for p in masters:
            cli(p, "CONFIG", "SET", "maxmemory", "0")
    with Runtime.open(fp32, tables=_url(cluster, "oom")) as rt:
        assert _same(rt.score(request), want)


def test_an_interrupted_publish_resumes_and_current_serves(cluster: RedisCluster, ext_bundles,
                                                           tiny_ckpt: Path) -> None:
    """kill -9 of a publishing process (held mid-write by a hung node): the current version keeps
    serving; the next publish completes."""
    fp32, int8 = ext_bundles
    publish(fp32, cluster.url, name="killed")
    request = _requests(tiny_ckpt)[0]
    c = Cluster([("127.0.0.1", cluster.ports[0])])
    meta = c.nodes[int(c.owner[K.key_slot(K.model_key("killed", "versions"))])].addr[1]
    c.close()
    hung = next(p for p in cluster.ports[:3] if p != meta)
    seed = f"redis://127.0.0.1:{meta}"  # the slot map comes from a live node
    cluster.kill(hung, signal.SIGSTOP)
    proc = subprocess.Popen([sys.executable, "-c", "from mixexport.cli import main; main()", "publish", str(int8),
                             "--store", seed, "--name", "killed"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while '"publishing"' not in cli(meta, "HGET", "{mx:killed}:versions", _version(int8)):
            assert time.monotonic() < end and proc.poll() is None, "the publish never started writing"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        cluster.kill(hung, signal.SIGCONT)
    with Runtime.open(fp32, tables=_url(cluster, "killed")) as rt:
        assert _same(rt.score(request), _local_scores(fp32, [request])[0])
    report = publish(int8, cluster.url, name="killed")
    assert report.action == "resumed"
    with Runtime.open(int8, tables=_url(cluster, "killed")) as rt:
        assert _same(rt.score(request), _local_scores(int8, [request])[0])


def _version(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["segments"][0]["tables_version"]


def test_verify_bench_and_triton_take_the_store(cluster: RedisCluster, ext_bundles, tmp_path: Path) -> None:
    fp32 = ext_bundles[0]
    publish(fp32, cluster.url, name="cli")
    url = _url(cluster, "cli")
    r = run_cli("verify", str(fp32), "--no-metrics", "--tables", url)
    assert r.code == 0 and r.out.startswith("PASS"), r.err
    r = run_cli("bench", str(fp32), "--candidates", "8", "--budget", "0.1", "--tables", url, "--json")
    assert r.code == 0, r.err
    cache = json.loads(r.out)["tables"]
    assert cache["store"] == "redis" and 0 < cache["cache"]["embed_item_table"]["hit_rate"] < 1
    r = run_cli("triton", str(fp32), "--out", str(tmp_path / "repo"), "--tables", url)
    assert r.code == 0, r.err
    files = [p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo").rglob("*") if p.is_file()]
    assert not [f for f in files if "/bundle/tables/" in f] and any(f.endswith(".onnx") for f in files)
    config = next((tmp_path / "repo").rglob("config.pbtxt")).read_text()
    assert "tables" in config and url in config
    r = run_cli("triton", str(fp32), "--out", str(tmp_path / "native"), "--flavour", "native", "--tables", url)
    assert r.code == 2 and "native flavour" in r.err


def test_a_row_changed_since_a_killed_run_fails_the_read_back(cluster: RedisCluster, ext_bundles) -> None:
    """A resumed publish skips the parts its killed run finished, but its read-back digests every
    bucket: a row changed in Redis meanwhile is found (exit 1, one line), and nothing is flipped."""
    fp32, int8 = ext_bundles
    publish(fp32, cluster.url, name="tamper")
    publish(int8, cluster.url, name="tamper")  # current: int8; fp32 stays complete as previous
    version = _version(fp32)
    c = Cluster([("127.0.0.1", cluster.ports[0])])
    try:
        _, record = read_record(c, "tamper", version, time.monotonic() + 5)
        meta = int(c.owner[K.key_slot(K.model_key("tamper", "versions"))])
        parts = [f"{t}/{k}" for t, lay in record["tables"].items() for k in range(int(lay["partitions"]))]
        from mixexport.tables.redis.cluster import pack

        # fp32 as a killed run leaves it: still publishing, every part recorded as written
        c.roundtrip({meta: [pack("HSET", K.model_key("tamper", "versions"), version,
                                 json.dumps({**record, "state": "publishing"})),
                            pack("SADD", K.model_key("tamper", f"done:{version[:16]}"), *parts)]},
                    time.monotonic() + 5)
        table, lay = next(iter(record["tables"].items()))
        key = K.bucket_key("tamper", version, table, lay["tags"][0])
        node = int(c.owner[lay["slots"][0]])
        (fields,) = c.roundtrip({node: [pack("HKEYS", key)]}, time.monotonic() + 5)[node]
        (value,) = c.roundtrip({node: [pack("HGET", key, fields[0])]}, time.monotonic() + 5)[node]
        changed = bytes([value[0] ^ 0x40]) + value[1:]  # one bit of one row
        c.roundtrip({node: [pack("HSET", key, fields[0], changed)]}, time.monotonic() + 5)
    finally:
        c.close()
    r = run_cli("publish", str(fp32), "--store", cluster.url, "--name", "tamper")
    assert r.code == 1, r.err
    assert "read back differ" in r.err and "not flipped" in r.err and "Traceback" not in r.err
    assert cli(cluster.ports[0], "-c", "GET", "{mx:tamper}:current").strip() == _version(int8)


def test_replies_split_across_reads_and_big_writes_arrive_whole(cluster: RedisCluster) -> None:
    """The client's non-blocking sockets: a 4 MiB value per master goes out in partial sends and
    comes back over many receives, all masters in one round trip; then 60 replies come back through
    a 7-byte receive buffer, so that nearly every reply is split across reads. Every reply is
    exactly what was written."""
    from mixexport.tables.redis.cluster import pack

    c = Cluster([("127.0.0.1", cluster.ports[0])])
    try:
        rng = np.random.default_rng(0)
        keys = {i: f"split:{{{K.tags_for_slots([int(slots[0])])[0]}}}".encode()
                for i, (_, slots) in enumerate(c.masters())}
        big = {i: rng.integers(0, 256, 4 << 20, dtype=np.uint8).tobytes() for i in keys}
        deadline = time.monotonic() + 30
        assert c.roundtrip({i: [pack("SET", k, big[i])] for i, k in keys.items()}, deadline) == \
            {i: [b"OK"] for i in keys}
        assert c.roundtrip({i: [pack("GET", k)] for i, k in keys.items()}, deadline) == \
            {i: [big[i]] for i in keys}
        for node in c.nodes:
            node.buf = bytearray(7)
        want = {i: [big[i][j:j + 50 + j] for j in range(60)] for i in keys}
        got = c.roundtrip({i: [pack("GETRANGE", k, j, j + 49 + j) for j in range(60)] for i, k in keys.items()},
                          deadline)
        assert got == want
    finally:
        c.close()

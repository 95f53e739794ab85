"""The runtime: request checks with clear errors, parity with the eager reference, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from mixexport.errors import BadInputError
from mixexport.caches import UserStateCache
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.specs import Request


@pytest.fixture(scope="module")
def runtimes(tiny_bundle: Path, tiny_ckpt: Path):
    with Runtime.open(tiny_bundle) as rt, Runtime.reference(load_source(tiny_ckpt)) as ref:
        yield rt, ref


def test_bundle_matches_reference_for_interleaved_users(runtimes, tiny_ckpt: Path) -> None:
    rt, ref = runtimes
    req = load_source(tiny_ckpt).example_request(3, 40, seed=5)
    assert req.user_index[:4].tolist() == [0, 1, 2, 0]
    np.testing.assert_allclose(rt.score(req)["logit"], ref.score(req)["logit"], rtol=1e-5, atol=1e-6)


def _bad(req: Request, where: str, name: str, value) -> Request:
    part = dict(getattr(req, where))
    if value is None:
        part.pop(name)
    else:
        part[name] = value
    return Request(**{**req.__dict__, where: part})


@pytest.mark.parametrize("case,expect", [
    ("missing", "missing ['item_dense']"),
    ("dtype", "'item_cat': expected dtype int64, found int32"),
    ("rank", "'item_dense': expected rank 2"),
    ("static", "'seq_items': axis 1 must be 16, found 15"),
    ("rows", "'item_dense': axis 0 (batch) is 3"),
    ("oov", "'user_cat' column 2: 1 id outside its vocabulary (expected 0 <= id < 3), first 3 at index [0, 2]"),
    ("negative", "'item_cat' column 0: 1 id outside its vocabulary (expected 0 <= id < 100), first -1 at index [1, 0]"),
    ("nan", "'item_dense' holds NaN/Inf"),
    ("index", "user_index values must be in [0, 2)"),
])
def test_bad_requests_name_the_input_and_its_spec(runtimes, tiny_ckpt: Path, case: str, expect: str) -> None:
    rt, _ = runtimes
    req = load_source(tiny_ckpt).example_request(2, 6, seed=1)
    if case == "missing":
        req = _bad(req, "item", "item_dense", None)
    elif case == "dtype":
        req = _bad(req, "item", "item_cat", req.item["item_cat"].astype(np.int32))
    elif case == "rank":
        req = _bad(req, "item", "item_dense", req.item["item_dense"][:, :, None])
    elif case == "static":
        req = _bad(req, "user", "seq_items", req.user["seq_items"][:, :15])
    elif case == "rows":
        req = _bad(req, "item", "item_dense", req.item["item_dense"][:3])
    elif case == "oov":
        u = req.user["user_cat"].copy()
        u[0, 2] = 3  # column 2 (gender-like) has vocab 3 in the synthetic schema
        req = _bad(req, "user", "user_cat", u)
    elif case == "negative":
        i = req.item["item_cat"].copy()
        i[1, 0] = -1
        req = _bad(req, "item", "item_cat", i)
    elif case == "nan":
        d = req.item["item_dense"].copy()
        d[2, 3] = np.nan
        req = _bad(req, "item", "item_dense", d)
    elif case == "index":
        req = Request(user=req.user, item=req.item, user_index=np.full(6, 2, dtype=np.int64))
    with pytest.raises(BadInputError) as e:
        rt.score(req)
    assert expect in e.value.message, e.value.message


def test_threads_give_exactly_the_sequential_results(runtimes, tiny_ckpt: Path) -> None:
    rt, _ = runtimes
    source = load_source(tiny_ckpt)
    reqs = [source.example_request(1 + i % 3, 1 + (7 * i) % 23, seed=i) for i in range(500)]
    want = [rt.score(r)["logit"] for r in reqs]
    got: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(len(reqs)):
                j = (i + 61 * t) % len(reqs)
                got[(t, j)] = rt.score(reqs[j])["logit"]
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(got) == 8 * 500
    for (t, j), v in got.items():
        assert np.array_equal(v, want[j])


def test_user_state_cache_is_bounded_lru() -> None:
    cache = UserStateCache(max_bytes=10 * 400)
    row = {"s": np.zeros(100, dtype=np.float32)}  # 400 bytes
    for uid in range(100_000):
        cache.put(uid, row)
    assert cache.stats.entries == 10 and cache.stats.bytes <= cache.max_bytes
    assert cache.get(99_999) is not None and cache.get(0) is None
    assert cache.stats.evictions == 100_000 - 10


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_open_and_close_many_times_keeps_memory_flat(tiny_bundle: Path, tiny_ckpt: Path) -> None:
    """verify and bench open several runtimes in one process: close() releases every session at
    once (not at garbage collection), even while the caller still holds the runtime and session
    objects (without the release, 150 cycles of the tiny bundle hold ~390 MiB)."""
    import gc
    import weakref

    source = load_source(tiny_ckpt)
    req = source.example_request(2, 8, seed=1)
    kept: list[tuple[Runtime, list]] = []

    def cycle() -> None:
        rt = Runtime.open(tiny_bundle)
        rt.score(req)
        native = [weakref.ref(s.session) for s in rt.sessions.values()]   # the ORT InferenceSessions
        held = list(rt.sessions.values())
        rt.close()
        assert all(ref() is None for ref in native)                       # released now, not at GC
        assert all(s.closed and s.session is None for s in held) and rt.sessions == {}
        kept.append((rt, held))

    for _ in range(10):  # warm-up: lazy imports, allocator pools, ORT's global state
        cycle()
    gc.collect()
    before = _resident_bytes()
    for _ in range(150):
        cycle()
    gc.collect()
    grown = _resident_bytes() - before
    assert grown < 40 * 1024**2, f"resident set grew {grown / 1024**2:.0f} MiB over 150 open/close cycles"
    with pytest.raises(RuntimeError, match="runtime is closed"):
        kept[-1][0].score(req)
    kept[-1][0].close()  # idempotent
    with Runtime.reference(source) as ref:
        ref.score(req)
    with pytest.raises(RuntimeError, match="is closed"):
        ref.score(req)

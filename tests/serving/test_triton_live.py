"""The python-backend flavour served live: pytriton's ``tritonserver`` on 127.0.0.1 serves a UG-Sep
split bundle and a LONGER KV bundle (one server for the module), requests go through
``tritonclient`` over HTTP and gRPC, and the scores match the eager model; repeated users hit the
per-user caches (counted on Triton's metrics endpoint), a history grown by new behaviours appends
to the KV cache, malformed requests get a clean error response and the server keeps serving. The
fixture always stops the server (its whole process group) and checks that it exited cleanly."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from mixexport.serving.triton import infer_inputs
from mixexport.source import Source, load_source
from mixexport.specs import Request, random_ids
from tests.serving.triton_env import require_triton

pytestmark = pytest.mark.xdist_group("triton")
MODELS = {"ug": "ugsep_split", "lo": "longer_kv"}


@pytest.fixture(scope="module")
def server(ugsep_split: tuple[Path, Path], longer_kv: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_triton()
    from mixexport.serving.triton import TritonOptions, write_repository
    from mixexport.serving.triton_server import TritonServer

    root = tmp_path_factory.mktemp("triton-repos")
    repos = []
    for name, (_, bundle) in (("ug", ugsep_split), ("lo", longer_kv)):
        write_repository(bundle, TritonOptions(out=root / name, name=name))
        repos.append(root / name)
    srv = TritonServer(repos)
    try:
        srv.start()
        pid = srv.process.pid
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, "tritonserver did not exit cleanly on SIGINT"
    with pytest.raises(ProcessLookupError):  # nothing of its process group (stubs) is left
        os.killpg(pid, 0)


@pytest.fixture(scope="module")
def sources(ugsep_split: tuple[Path, Path], longer_kv: tuple[Path, Path]) -> dict[str, Source]:
    return {"ug": load_source(ugsep_split[0]), "lo": load_source(longer_kv[0])}


def client(server: Any, protocol: str) -> tuple[Any, Any]:
    if protocol == "http":
        import tritonclient.http as mod

        return mod, mod.InferenceServerClient(server.http_url)
    import tritonclient.grpc as mod

    return mod, mod.InferenceServerClient(server.grpc_url)


def infer(mod: Any, cl: Any, model: str, req: Request, user_ids: list[str] | None = None,
          override: dict[str, np.ndarray] | None = None) -> np.ndarray:
    feeds = {**req.user, **req.item, "user_index": req.user_index, **(override or {})}
    if user_ids is not None:
        feeds["user_id"] = np.array([u.encode() for u in user_ids], dtype=np.object_)
    return cl.infer(model, infer_inputs(mod, feeds)).as_numpy("logit")


def eager(source: Source, req: Request) -> np.ndarray:
    from mixexport.runtime import Runtime

    with Runtime.reference(source) as ref:
        return ref.score(req)["logit"]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def cache_counts(server: Any, model: str, successes: float = 0.0) -> dict[str, float]:
    """The model's cache counters and request successes from the metrics endpoint. Triton counts a
    success after the response has gone out, so this waits (up to 10 s) until ``successes`` are counted."""
    cache = re.compile(r'^mixexport_cache_total\{kind="(\w+)",model="' + model + r'"\} (\S+)$', re.M)
    success = re.compile(r'^nv_inference_request_success\{model="' + model + r'",version="1"\} (\S+)$', re.M)
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        counts = {k: float(v) for k, v in cache.findall(text)}
        ok = success.search(text)
        counts["success"] = float(ok.group(1)) if ok else 0.0
        if counts["success"] >= successes or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["ug", "lo"])
def test_parity_and_cache_hits(server: Any, sources: dict[str, Source], model: str, protocol: str) -> None:
    """Several users × N candidates score like eager (≤ 1e-5 relative); the same users again are
    served from the per-user caches and score exactly as before."""
    mod, cl = client(server, protocol)
    try:
        hit = "user_hit" if model == "ug" else "kv_hit"
        for users, n in ((1, 16), (3, 7), (4, 33)):
            req = sources[model].example_request(users, n, seed=100 * users + n)
            ids = [f"{protocol}-{users}x{n}-{u}" for u in range(users)]
            start = cache_counts(server, model)
            first = infer(mod, cl, model, req, ids)
            assert first.shape == (n, 1) and rel_err(first, eager(sources[model], req)) <= 1e-5
            before = cache_counts(server, model, successes=start["success"] + 1)
            again = infer(mod, cl, model, req, ids)
            after = cache_counts(server, model, successes=before["success"] + 1)
            assert np.array_equal(again, first)
            assert after[hit] - before[hit] == users and after["success"] - before["success"] == 1
        # without user ids nothing is cached, and the scores are the same
        assert rel_err(infer(mod, cl, model, req), first) <= 1e-6
    finally:
        cl.close()


def test_kv_append_across_requests(server: Any, sources: dict[str, Source]) -> None:
    """A user's history grown by one position of new behaviours (the oldest dropped) appends to
    the KV cache kept from the previous request, and scores like eager on the new history."""
    mod, cl = client(server, "http")
    src = sources["lo"]
    try:
        req = src.example_request(2, 9, seed=7)
        infer(mod, cl, "lo", req, ["app-0", "app-1"])
        k = int(src.multiples["seq"][1])  # items per position
        seq_spec = next(s for s in src.inputs if s.name == "seq_items")
        seq = req.user["seq_items"]
        grown = np.concatenate([seq[:, k:], random_ids(seq_spec, (2, k), np.random.default_rng(3))], axis=1)
        req2 = Request(user={**req.user, "seq_items": grown}, item=req.item, user_index=req.user_index)
        before = cache_counts(server, "lo")
        got = infer(mod, cl, "lo", req2, ["app-0", "app-1"])
        after = cache_counts(server, "lo")
        assert after["kv_append"] - before["kv_append"] == 2 and after["kv_miss"] == before["kv_miss"]
        assert rel_err(got, eager(src, req2)) <= 1e-5
    finally:
        cl.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests(server: Any, sources: dict[str, Source], protocol: str) -> None:
    """Refused with one clean message (the runtime's check, or Triton's own for a shape the config
    rules out); the server keeps serving."""
    from tritonclient.utils import InferenceServerException

    mod, cl = client(server, protocol)
    req = sources["ug"].example_request(2, 5, seed=1)
    cases = [
        ({"user_index": np.array([0, 1, 2, 0, 1], dtype=np.int64)}, None,
         "error: user_index values must be in [0, 2), found 0..2 hint:"),
        ({"item_cat": np.full((5, 2), 10**6, dtype=np.int64)}, None, "outside its vocabulary"),
        ({}, ["only-one"], "user_ids has 1 entries for 2 users"),
        ({"item_cat": np.zeros((5, 3), dtype=np.int64)}, None, "item_cat"),  # Triton: dims [-1, 2]
        ({"item_dense": req.item["item_dense"].astype(np.float64)}, None, "item_dense"),  # Triton: TYPE_FP32
    ]
    try:
        for override, ids, message in cases:
            with pytest.raises(InferenceServerException) as info:
                infer(mod, cl, "ug", req, ids, override)
            text = info.value.message()
            assert message in text and "Traceback" not in text, text
        assert rel_err(infer(mod, cl, "ug", req), eager(sources["ug"], req)) <= 1e-5
    finally:
        cl.close()


#!/usr/bin/env python
"""A bounded load run of a bundle served by Triton (python-backend flavour), loopback only.

Writes the bundle's python-flavour repository to a temporary directory, starts pytriton's
``tritonserver`` on 127.0.0.1 (``pip install -e ".[triton]"``), and runs K concurrent clients × M
requests (U users × N candidates each, users drawn from a pool of D ids so that repeated users hit
the per-user caches). Reports client-side latency (p50/p90/p99) and throughput beside Triton's own
figures from its metrics endpoint for the same phase: request counts (success / failure), average
request / queue / compute time, the server-side p50/p99 (``summary_latencies``) and the cache
counters of ``mixexport_cache_total``. The server is always stopped.

    python scripts/triton_load.py BUNDLE --clients 4 --requests 200 --users 1 --candidates 64
    python scripts/triton_load.py BUNDLE --protocol grpc --json load.json

Requests are random valid inputs drawn from the manifest's specs (ids inside their vocabularies;
the sequence length of the bundle's sample request). Exit 0 when every request succeeded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from mixexport.bundle import read_manifest
from mixexport.serving.triton import TritonOptions, write_repository
from mixexport.serving.triton_server import TritonServer
from mixexport.specs import TensorSpec, random_ids


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", type=int, default=4, help="K concurrent clients (threads, one connection each)")
    ap.add_argument("--requests", type=int, default=200, help="M requests per client")
    ap.add_argument("--users", type=int, default=1, help="U users per request")
    ap.add_argument("--candidates", type=int, default=64, help="N candidates per request")
    ap.add_argument("--pool", type=int, default=32, help="D distinct user ids requests draw from")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ap.add_argument("--warmup", type=int, default=10, help="requests per client before the measured phase")
    ap.add_argument("--instances", type=int, default=1, help="python-backend model instances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    return ap.parse_args()


def _rows(spec: TensorSpec, n: int, dims: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    shape = (n, *(d if isinstance(d, int) else dims[d] for d in spec.shape[1:]))
    if spec.vocab is not None or np.dtype(spec.dtype).kind in "iu":
        return random_ids(spec, shape, rng)
    return rng.standard_normal(shape).astype(spec.dtype)


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(nv_inference_\w+|mixexport_cache_total)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def _pick(metrics: dict[str, float], name: str, model: str, extra: str = "") -> float:
    for key, value in metrics.items():
        if key.startswith(name + "{") and f'model="{model}"' in key and extra in key:
            return value
    return float("nan")


def main() -> int:
    args = _parse()
    manifest = read_manifest(args.bundle)
    sample = np.load(manifest.file("inputs/sample.npz"))
    dims = {}
    for s in manifest.inputs:  # symbolic non-batch axes (the sequence) from the sample request
        key = ("user/" if s.user_side else "item/") + s.name
        for axis, d in enumerate(s.shape[1:], start=1):
            if isinstance(d, str) and key in sample:
                dims[d] = int(sample[key].shape[axis])
    rng = np.random.default_rng(args.seed)
    user_specs = [s for s in manifest.inputs if s.user_side]
    item_specs = [s for s in manifest.inputs if not s.user_side]
    pool = {f"user-{i}": {s.name: _rows(s, 1, dims, rng) for s in user_specs} for i in range(args.pool)}
    if args.protocol == "http":
        import tritonclient.http as mod
    else:
        import tritonclient.grpc as mod
    from mixexport.serving.triton import infer_inputs

    def request(r: np.random.Generator) -> list[Any]:
        ids = [f"user-{i}" for i in r.choice(args.pool, size=args.users, replace=False)]
        feeds = {s.name: np.concatenate([pool[u][s.name] for u in ids]) for s in user_specs}
        feeds.update({s.name: _rows(s, args.candidates, dims, r) for s in item_specs})
        feeds["user_index"] = np.arange(args.candidates, dtype=np.int64) % args.users
        feeds["user_id"] = np.array([u.encode() for u in ids], dtype=np.object_)
        return infer_inputs(mod, feeds)

    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mixexport-load-") as tmp:
        write_repository(args.bundle, TritonOptions(out=Path(tmp) / "repo", name="model", instances=args.instances))
        with TritonServer(Path(tmp) / "repo", extra_args=("--metrics-config=summary_latencies=true",)) as server:
            url = server.http_url if args.protocol == "http" else server.grpc_url
            barrier = threading.Barrier(args.clients + 1)

            def worker(k: int) -> None:
                r = np.random.default_rng([args.seed, k])
                reqs = [request(r) for _ in range(args.warmup + args.requests)]  # built before timing
                client = mod.InferenceServerClient(url)
                try:
                    for inputs in reqs[:args.warmup]:
                        client.infer("model", inputs)
                    barrier.wait()
                    for inputs in reqs[args.warmup:]:
                        t0 = time.perf_counter()
                        try:
                            client.infer("model", inputs)
                        except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                            errors.append(str(e))
                        latencies[k].append(time.perf_counter() - t0)
                    barrier.wait()
                finally:
                    client.close()

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
            for t in threads:
                t.start()
            barrier.wait()
            before, t0 = _metrics(server.metrics_url), time.perf_counter()
            barrier.wait()
            wall, after = time.perf_counter() - t0, _metrics(server.metrics_url)
            for t in threads:
                t.join()
    lat = np.array([x for xs in latencies for x in xs]) * 1e3
    done = len(lat)

    def delta(name: str, extra: str = "") -> float:
        return _pick(after, name, "model", extra) - _pick(before, name, "model", extra)

    ok = delta("nv_inference_request_success")
    summary = {
        "bundle": str(args.bundle), "family": manifest.data["model"].get("family"), "protocol": args.protocol,
        "clients": args.clients, "requests_per_client": args.requests, "users": args.users,
        "candidates": args.candidates, "user_pool": args.pool, "instances": args.instances,
        "client": {"requests": done, "errors": len(errors), "wall_s": round(wall, 3),
                   "throughput_rps": round(done / wall, 1), "candidates_per_s": round(done * args.candidates / wall),
                   "p50_ms": round(float(np.percentile(lat, 50)), 3), "p90_ms": round(float(np.percentile(lat, 90)), 3),
                   "p99_ms": round(float(np.percentile(lat, 99)), 3)},
        "server": {"success": ok, "failure": delta("nv_inference_request_failure"),
                   "throughput_rps": round(ok / wall, 1),
                   "avg_request_ms": round(delta("nv_inference_request_duration_us") / ok / 1e3, 3),
                   "avg_queue_ms": round(delta("nv_inference_queue_duration_us") / ok / 1e3, 3),
                   "avg_compute_ms": round(delta("nv_inference_compute_infer_duration_us") / ok / 1e3, 3),
                   # summary quantiles over the server's sliding window (warmup included if still in it)
                   "p50_ms": round(_pick(after, "nv_inference_request_summary_us", "model", 'quantile="0.5"') / 1e3, 3),
                   "p99_ms": round(_pick(after, "nv_inference_request_summary_us", "model", 'quantile="0.99"') / 1e3, 3),
                   "cache": {k: delta("mixexport_cache_total", f'kind="{k}"')
                             for k in ("user_hit", "user_miss", "kv_hit", "kv_append", "kv_miss")}},
        "first_errors": errors[:3],
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if not errors and summary["server"]["failure"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

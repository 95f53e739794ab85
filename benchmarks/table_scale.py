"""A 4.1 GB embedding table outside the engine: build memory, bundle size and serving latency.

Setup: a rankmixer-shaped checkpoint (base: T=16, D=320, L=2, emb_dim 64) whose item table has
16,000,000 rows × 64 fp32 (4.1 GB), written to disk. It is built with ``externalize-embeddings``
(default threshold: only the big table goes out) in a child process, whose peak RSS
(``resource.getrusage``) and wall time are measured. Then score p50 at 1 user × 256 candidates
with the local table store vs the same model with a small item table (100,000 rows) kept in the
graph, both on ONNX Runtime CPU, measured alternately in this process.

    python benchmarks/table_scale.py                 # writes benchmarks/results/table_scale.json
    python benchmarks/table_scale.py --rows 1000000  # a quicker, smaller run (another file name)

Goals (issue 24): build peak RSS <= 1.5 GB; local-store p50 <= 1.15x the in-graph bundle.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
from mixexport.machine import provenance, write_result  # noqa: E402

ITEM_COLUMNS = 12  # the second item column's vocabulary; the first takes the rest of the table


def make_checkpoint(path: Path, rows: int, emb_dim: int) -> None:
    """A rankmixer base-shaped checkpoint whose item table has ``rows`` rows (child process: the
    table is whole in this process's memory while it is written)."""
    import torch

    from mixexport.models import rankmixer, save_checkpoint
    from mixexport.models.common import FeatureSchema

    torch.manual_seed(0)
    schema = FeatureSchema(item_vocab=(rows - ITEM_COLUMNS, ITEM_COLUMNS))
    config = rankmixer.Config(schema=schema, tokens=16, dim=320, layers=2, emb_dim=emb_dim)
    save_checkpoint(rankmixer.Model(config).eval(), path, {})


def child_build(ckpt: Path, out: Path, passes: str) -> None:
    """Build in this (child) process and print its peak RSS and the build's wall time as JSON."""
    from mixexport.pipeline import BuildOptions, build

    phases: list[dict[str, object]] = []

    def progress(msg: str) -> None:  # the peak so far when each build step starts: where memory goes
        phases.append({"step": msg, "seconds": round(time.perf_counter() - t0, 1),
                       "peak_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})

    t0 = time.perf_counter()
    build(ckpt, BuildOptions(out=out, passes=tuple(p for p in passes.split(",") if p), bench=False,
                             metrics=False, force=True), progress=progress)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "phases": phases}))


def _run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def latency(bundles: dict[str, tuple[Path, Path]], candidates: int, repeats: int) -> dict[str, dict[str, float]]:
    """p50/p90 of Runtime.score at 1 × ``candidates``, the bundles measured alternately, each on a
    request of random valid ids of its own checkpoint (the big table's ids span all 16 M rows)."""
    from mixexport.runtime import Runtime
    from mixexport.source import load_source

    times: dict[str, list[float]] = {k: [] for k in bundles}
    runtimes = {k: Runtime.open(b) for k, (b, _) in bundles.items()}
    sources = {k: load_source(c) for k, (_, c) in bundles.items()}
    requests = {k: [src.example_request(1, candidates, seed=s) for s in range(8)] for k, src in sources.items()}
    try:
        for k, rt in runtimes.items():
            for r in requests[k]:
                rt.score(r)  # warm-up (ONNX Runtime's first runs)
        for i in range(repeats):
            for k, rt in runtimes.items():
                t = time.perf_counter()
                rt.score(requests[k][i % len(requests[k])])
                times[k].append(time.perf_counter() - t)
    finally:
        for rt in runtimes.values():
            rt.close()
    return {k: {"p50_ms": float(np.percentile(v, 50) * 1e3), "p90_ms": float(np.percentile(v, 90) * 1e3)}
            for k, v in times.items()}


SUMMARY = ("Embedding tables outside the engine: building a rankmixer-shaped checkpoint with one 16M x 64 fp32 item "
           "table with externalize-embeddings (peak RSS, time, bundle bytes) and scoring it from the local store "
           "against the same model with a small table in the graph, 1 user x 256.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16_000_000, help="item table rows (default 16,000,000)")
    ap.add_argument("--dim", type=int, default=64, help="embedding width (default 64)")
    ap.add_argument("--small-rows", type=int, default=100_000, help="item table rows of the in-graph model")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixexport-table-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and bundles in --work")
    ap.add_argument("--reuse", action="store_true", help="reuse the bundles (and build numbers) a --keep run left")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/table_scale.json)")
    args = ap.parse_args()
    started = provenance()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    big, small = work / f"rankmixer-item{args.rows}.pt", work / f"rankmixer-item{args.small_rows}.pt"
    for path, rows in ((big, args.rows), (small, args.small_rows)):
        if not path.is_file():
            print(f"writing {path}", file=sys.stderr)
            _run_child("--child-checkpoint", str(path), str(rows), str(args.dim))
    builds = {}
    for name, ckpt, passes in (("ext", big, "externalize-embeddings"), ("in-graph", small, "")):
        cached = work / f"{name}.build.json"
        if args.reuse and cached.is_file() and (work / name / "manifest.json").is_file():
            builds[name] = json.loads(cached.read_text())
            continue
        print(f"building {name} (child process)", file=sys.stderr)
        builds[name] = _run_child("--child-build", str(ckpt), str(work / name), passes)
        cached.write_text(json.dumps(builds[name]))
    ext, inside = builds["ext"], builds["in-graph"]
    lat = latency({"local_store": (work / "ext", big), "in_graph_small_table": (work / "in-graph", small)},
                  args.candidates, args.repeats)
    manifest = json.loads((work / "ext" / "manifest.json").read_text())
    table = next(t for t in manifest["tables"] if t["name"] == "embed_item_table")
    ratio = lat["local_store"]["p50_ms"] / lat["in_graph_small_table"]["p50_ms"]
    result = {
        "checkpoint": {"path": str(big), "bytes": big.stat().st_size, "item_table": [args.rows, args.dim],
                       "item_table_bytes": args.rows * args.dim * 4},
        "build": {"passes": ["externalize-embeddings"], "seconds": ext["seconds"], "phases": ext.get("phases"),
                  "peak_rss_bytes": ext["peak_rss_bytes"], "peak_rss_gb": ext["peak_rss_bytes"] / 1e9,
                  "goal_peak_rss_gb": 1.5, "meets_rss_goal": ext["peak_rss_bytes"] <= 1.5e9},
        "bundle": {"bytes": _bytes(work / "ext"), "segments_bytes": _bytes(work / "ext" / "segments"),
                   "table_bytes": _bytes(work / "ext" / "tables"), "partitions": table["partitions"]},
        "in_graph_build": {"item_table": [args.small_rows, args.dim], "seconds": inside["seconds"],
                           "phases": inside.get("phases"),
                           "peak_rss_bytes": inside["peak_rss_bytes"], "bundle_bytes": _bytes(work / "in-graph")},
        "latency_1x%d" % args.candidates: lat,
        "p50_ratio_local_store_vs_in_graph": ratio, "goal_ratio": 1.15, "meets_latency_goal": ratio <= 1.15,
    }
    default = "table_scale.json" if args.rows == 16_000_000 else f"table_scale_{args.rows}.json"
    out = args.out or ROOT / "benchmarks" / "results" / default
    write_result(out, out.stem, SUMMARY, started, result)
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-checkpoint":
        make_checkpoint(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-build":
        child_build(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        main()

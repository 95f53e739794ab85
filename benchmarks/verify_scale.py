"""Throughput, memory and start-up of ``mixexport score`` over Parquet: the local engine, the ray
engine with 1 and 2 actors, and a plain pyarrow + Runtime loop as the baseline, on rankmixer tiny
(overhead-bound) and base (compute-bound); 1 ONNX Runtime intra-op thread per worker. Peak RSS is
summed over every process of the run (the Ray driver, raylet, GCS and actors included), sampled
every 0.1 s. Start-up is the wall time of the same command on one batch of rows. At the largest
size, the streaming AUC (2^20 bins, refined) of the bundle's scores is compared with sklearn's.

    python benchmarks/verify_scale.py --rows 200000 --files 4 --configs tiny,base
    python benchmarks/verify_scale.py --memory-rows 1000000,8000000 --out benchmarks/results/verify_scale-memory.json

Writes benchmarks/results/verify_scale.json (with the machine, load average, command, commit, date).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from mixexport.machine import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIXEXPORT = str(Path(sys.executable).parent / "mixexport")

PLAIN_LOOP = r'''
import sys, numpy as np, pyarrow.parquet as pq
from mixexport.bundle import read_manifest
from mixexport.scale.schema import column_array
from mixexport.scale.worker import open_runtime
from mixexport.specs import Request
m = read_manifest(sys.argv[1]); specs = m.inputs
rt = open_runtime(m, 1)
for path in sys.argv[3:]:
    for b in pq.ParquetFile(path).iter_batches(batch_size=int(sys.argv[2]), columns=[s.name for s in specs] + ["user_key"]):
        n = b.num_rows
        feeds = {s.name: column_array(path, s, b.column(s.name), n) for s in specs}
        key = b.column("user_key").to_numpy()
        starts = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1])
        idx = np.repeat(np.arange(len(starts)), np.diff(np.concatenate([starts, [n]])))
        rt.score(Request(user={s.name: feeds[s.name][starts] for s in specs if s.user_side},
                         item={s.name: feeds[s.name] for s in specs if not s.user_side}, user_index=idx), validate=False)
'''


def _measure(cmd: list[str]) -> dict[str, float]:
    """Wall time and peak RSS summed over the process tree of ``cmd`` (Ray's daemons included)."""
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        time.sleep(0.1)
    log.seek(0)
    err = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mib": peak / 2**20}


def _bundle(config: str, work: Path) -> Path:
    out = work / f"rankmixer-{config}"
    if out.exists():
        return out
    subprocess.run([sys.executable, str(ROOT / "benchmarks/make_checkpoint.py"), "--family", "rankmixer",
                    "--config", config, "--out", str(work / f"{config}.pt")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([MIXEXPORT, "-q", "build", str(work / f"{config}.pt"), "--out", str(out), "--no-bench"],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def _runners(bundle: Path, data: Path, files: list[str], batch: int, out: Path) -> dict[str, list[str]]:
    score = [MIXEXPORT, "-q", "score", str(bundle), "--data", str(data), "--key", "user_key", "--batch-rows", str(batch)]
    return {"plain pyarrow + Runtime loop": [sys.executable, "-c", PLAIN_LOOP, str(bundle), str(batch), *files],
            "local": [*score, "--out", str(out / "local")],
            "ray, 1 actor": [*score, "--engine", "ray", "--workers", "1", "--out", str(out / "ray1")],
            "ray, 2 actors": [*score, "--engine", "ray", "--workers", "2", "--out", str(out / "ray2")]}


def _auc_check(scores: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from mixexport.verification.streaming import RefinedCounts, ScoreStats, auc_with_bound, refine_plan

    tables = [pq.read_table(p, columns=["label", "logit"]) for p in sorted(scores.glob("*.parquet"))]
    stats = ScoreStats()
    for t in tables:
        stats.merge(ScoreStats.partial(t.column("label").to_numpy(), t.column("logit").to_numpy()))
    coarse, coarse_bound = auc_with_bound(stats)
    plan = refine_plan({"b": stats}, 1e-6)
    refined = RefinedCounts()
    for t in tables:
        refined.merge(RefinedCounts.partial(t.column("label").to_numpy(), t.column("logit").to_numpy(), plan.bins["b"]))
    value, bound = auc_with_bound(stats, refined, plan.bins["b"])
    out = {"rows": int(sum(t.num_rows for t in tables)), "auc_2^20_bins": coarse, "bound_2^20_bins": coarse_bound,
           "auc_refined": value, "bound_refined": bound, "refined_bins": int(len(plan.bins["b"]))}
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return {**out, "sklearn": "not installed"}
    y = np.concatenate([t.column("label").to_numpy() for t in tables])
    s = np.concatenate([t.column("logit").to_numpy() for t in tables])
    exact = float(roc_auc_score(y, s))
    return {**out, "sklearn_auc": exact, "abs_diff_2^20_bins": abs(coarse - exact), "abs_diff_refined": abs(value - exact),
            "bound_holds": abs(coarse - exact) <= coarse_bound and abs(value - exact) <= bound}


def memory_scaling(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Peak RSS of ``score`` on both engines at each of ``--memory-rows`` (rankmixer ``--memory-config``),
    its growth from the smallest to the largest size, the two engines' scores compared, and the
    streaming AUC at the largest size against sklearn's."""
    import pyarrow.parquet as pq

    from mixexport.scale.synth import write_eval_parquet

    sizes = [int(x) for x in args.memory_rows.split(",")]
    bundle = _bundle(args.memory_config, work)
    out: dict[str, Any] = {"config": args.memory_config, "ray_workers": args.memory_workers, "sizes": {}}
    score = [MIXEXPORT, "-q", "score", str(bundle), "--key", "user_key", "--batch-rows", str(args.batch_rows)]
    engines = {"local": [], f"ray, {args.memory_workers} actors": ["--engine", "ray", "--workers",
                                                                   str(args.memory_workers)]}
    for rows in sizes:
        data = work / f"data-{args.memory_config}-{rows}-{args.memory_files}f"
        if not data.exists():
            write_eval_parquet(bundle, data, rows, args.memory_files)
        res: dict[str, Any] = {}
        for name, extra in engines.items():
            dest = work / f"mem-{rows}-{name.split(',')[0]}"
            subprocess.run(["rm", "-rf", str(dest)], check=True)
            m = _measure([*score, "--data", str(data), *extra, "--out", str(dest)])
            res[name] = {**m, "rows_per_s_end_to_end": rows / m["wall_s"]}
            print(f"memory {rows} {name}: {m['peak_rss_mib']:.0f} MiB, {rows / m['wall_s']:.0f} rows/s", flush=True)
        local, ray = (work / f"mem-{rows}-{n}" for n in ("local", "ray"))
        same = all(pq.read_table(a).column("logit").equals(pq.read_table(ray / a.name).column("logit"))
                   for a in sorted(local.glob("*.parquet")))
        res["ray_scores_equal_local"] = same
        out["sizes"][str(rows)] = res
    lo, hi = str(min(sizes)), str(max(sizes))
    out["peak_rss_growth"] = {name: out["sizes"][hi][name]["peak_rss_mib"] / out["sizes"][lo][name]["peak_rss_mib"]
                              for name in engines}
    out["auc_at_largest"] = _auc_check(work / f"mem-{hi}-local")
    return out


SUMMARY = ("verify/score over Parquet: rows/s, peak RSS summed over all processes and start-up time of the local "
           "and Ray engines against a plain pyarrow + Runtime loop, and the streaming AUC against sklearn's.")
MEMORY_SUMMARY = ("verify/score over Parquet at growing sizes: peak RSS summed over all processes of the local and "
                  "Ray engines, its growth, and the streaming AUC at the largest size against sklearn's.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="rows for rankmixer tiny")
    ap.add_argument("--base-rows", type=int, default=None, help="rows for rankmixer base (default: --rows / 5)")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--batch-rows", type=int, default=8192)
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--work", default=None, help="keep bundles and data here (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/verify_scale.json"))
    ap.add_argument("--memory-rows", default=None,
                    help="instead of the throughput runs: peak RSS of both engines at these sizes (e.g. "
                         "1000000,8000000), and the streaming AUC at the largest")
    ap.add_argument("--memory-config", default="tiny")
    ap.add_argument("--memory-files", type=int, default=16)
    ap.add_argument("--memory-workers", type=int, default=2)
    args = ap.parse_args()
    started = provenance(["python", "benchmarks/verify_scale.py", *sys.argv[1:]])
    from mixexport.scale.synth import write_eval_parquet

    work = Path(args.work or tempfile.mkdtemp(prefix="verify-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.memory_rows:
        doc = {"name": Path(args.out).stem, "summary": MEMORY_SUMMARY, **started, "batch_rows": args.batch_rows,
               "note": "mixexport score --key user_key on each engine; peak RSS summed over every process of the "
                       "run (Ray's daemons included); 1 ORT intra-op thread per worker",
               "results": memory_scaling(args, work)}
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}", flush=True)
        return
    results: dict[str, Any] = {}
    for config in args.configs.split(","):
        bundle = _bundle(config, work)
        rows = args.rows if config == "tiny" else (args.base_rows or args.rows // 5)
        data, small = work / f"data-{config}-{rows}", work / f"data-{config}-startup"
        if not data.exists():
            write_eval_parquet(bundle, data, rows, args.files)
            write_eval_parquet(bundle, small, args.batch_rows, 1)
        files = [str(p) for p in sorted(data.glob("*.parquet"))]
        res: dict[str, Any] = {}
        out = work / f"out-{config}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir()
        for name in _runners(bundle, data, files, args.batch_rows, work):
            startup = _measure(_runners(bundle, small, [str(p) for p in sorted(small.glob("*.parquet"))],
                                        args.batch_rows, out / "startup")[name])["wall_s"]
            m = _measure(_runners(bundle, data, files, args.batch_rows, out)[name])
            steady = m["wall_s"] - startup  # under a noisy load the one-batch run can take longer: then None
            res[name] = {**m, "rows": rows, "startup_s": startup, "rows_per_s_end_to_end": rows / m["wall_s"],
                         "rows_per_s_after_startup": rows / steady if steady > 0 else None}
            print(f"{config} {name}: {rows / m['wall_s']:.0f} rows/s end to end, {m['peak_rss_mib']:.0f} MiB, "
                  f"start-up {startup:.1f} s", flush=True)
        base = res["plain pyarrow + Runtime loop"]["rows_per_s_end_to_end"]
        for r in res.values():
            r["end_to_end_vs_plain_loop"] = r["rows_per_s_end_to_end"] / base
        res["auc"] = _auc_check(work / f"out-{config}" / "local")
        results[f"rankmixer-{config}"] = res
        doc = {"name": Path(args.out).stem, "summary": SUMMARY, **started, "files": args.files,
               "batch_rows": args.batch_rows,
               "note": "mixexport score --key user_key; 1 ORT intra-op thread per worker; rows_per_s excludes "
                       "start-up (wall minus the same command's wall on one batch)", "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")  # after each config: a long run keeps what it has
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()

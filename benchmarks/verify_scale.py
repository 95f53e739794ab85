"""Throughput, memory and start-up of ``mixexport score`` over Parquet: the local engine, the ray
engine with 1 and 2 actors, and a plain pyarrow + Runtime loop as the baseline, on rankmixer tiny
(overhead-bound) and base (compute-bound); 1 ONNX Runtime intra-op thread per worker. Peak RSS is
summed over every process of the run (the Ray driver, raylet, GCS and actors included), sampled
every 0.1 s. Start-up is the wall time of the same command on one batch of rows. At the largest
size, the streaming AUC (2^20 bins, refined) of the bundle's scores is compared with sklearn's.

    python benchmarks/verify_scale.py --rows 200000 --files 4 --configs tiny,base

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


SUMMARY = ("verify/score over Parquet: rows/s, peak RSS summed over all processes and start-up time of the local "
           "and Ray engines against a plain pyarrow + Runtime loop, and the streaming AUC against sklearn's.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="rows for rankmixer tiny")
    ap.add_argument("--base-rows", type=int, default=None, help="rows for rankmixer base (default: --rows / 5)")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--batch-rows", type=int, default=8192)
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--work", default=None, help="keep bundles and data here (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/verify_scale.json"))
    args = ap.parse_args()
    started = provenance(["python", "benchmarks/verify_scale.py", *sys.argv[1:]])
    from mixexport.scale.synth import write_eval_parquet

    work = Path(args.work or tempfile.mkdtemp(prefix="verify-scale-"))
    work.mkdir(parents=True, exist_ok=True)
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

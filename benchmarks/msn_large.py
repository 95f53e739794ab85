#!/usr/bin/env python
"""An MSN whose memory value table passes 2 GB (``msn.large()``: 1024² = 2^20 slots × 512 floats,
2 GiB) through ``mixexport build`` → ``verify --json`` → ``bench``, the ONNX weights in external data.

Each step runs as its own ``mixexport`` process; for each it reports the wall time and the peak
resident memory of that process (``ru_maxrss`` of the finished child, from ``resource.getrusage``),
plus the checkpoint and bundle sizes on disk. Not part of CI (it writes ~4-6 GB and needs ~10+ GB
of memory); run it alone on a quiet machine:

    python benchmarks/msn_large.py --work /tmp/msn-large [--sub-keys 1024 --value-dim 512] [--json out.json]

It writes ``benchmarks/results/msn_large.json`` (``--save NAME`` names it, ``--no-save`` skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import results

MIXEXPORT = str(Path(sys.executable).parent / "mixexport")


def _tree_bytes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def _step(name: str, argv: list[str]) -> dict[str, Any]:
    """Run one mixexport command; its wall time, exit code and peak RSS (this child's alone)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of RUSAGE_CHILDREN is the largest of all waited-for children: report it only when
    # this child raised it (the steps run in order, the largest so far is then this one's)
    out = {"step": name, "argv": argv[1:], "rc": proc.returncode, "wall_s": round(wall, 2),
           "peak_rss_gib": round(peak_kib / 2**20, 3) if peak_kib > before else None,
           "peak_rss_note": None if peak_kib > before else f"<= {before / 2**20:.3f} GiB (an earlier step's peak)"}
    print(f"{name}: rc {proc.returncode}, {wall:.1f} s, peak RSS "
          f"{out['peak_rss_gib'] if out['peak_rss_gib'] is not None else out['peak_rss_note']} GiB", flush=True)
    if proc.returncode:
        out["stderr_tail"] = proc.stderr[-2000:]
        print(proc.stderr[-2000:], file=sys.stderr)
    if name in ("verify", "bench") and proc.returncode == 0:
        try:
            out["result"] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            out["stdout_tail"] = proc.stdout[-3000:]
    else:
        out["stdout_tail"] = proc.stdout[-3000:]
    return out


def _latency_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """``mixexport bench --json``'s runners × N as flat rows."""
    return [{"runner": name, "candidates": int(n), "p50_ms": round(st["p50_ms"], 2), "p90_ms": round(st["p90_ms"], 2),
             "runs": st["runs"], **({"x_vs_eager": round(st["speedup_vs_eager"], 3)} if "speedup_vs_eager" in st else {})}
            for name, per in bench.get("runners", {}).items() for n, st in per.items()]


def main() -> int:
    started = results.start()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (removed first)")
    ap.add_argument("--sub-keys", type=int, default=1024, help="n: the memory has n² slots")
    ap.add_argument("--value-dim", type=int, default=512)
    ap.add_argument("--candidates", default="1,64,256")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundle")
    ap.add_argument("--json", type=Path, help="also write the full results (every step's output) here")
    results.add_save_options(ap, "msn_large")
    args = ap.parse_args()

    import torch

    from mixexport.models import msn, save_checkpoint

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    config = dataclasses.replace(msn.large(), sub_keys=args.sub_keys, value_dim=args.value_dim)
    table_bytes = config.slots * config.value_dim * 4
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = msn.Model(config).eval()
    ckpt = save_checkpoint(model, args.work / "msn-large.pt", {"note": "random init, benchmarks/msn_large.py"})
    params = sum(p.numel() for p in model.parameters())
    del model
    made = time.perf_counter() - t0
    print(f"checkpoint: {params:,} parameters, value table {table_bytes / 2**30:.3f} GiB, "
          f"{ckpt.stat().st_size / 2**30:.3f} GiB on disk ({made:.1f} s)", flush=True)
    bundle = args.work / "bundle"
    steps = [_step("build", [MIXEXPORT, "build", str(ckpt), "--out", str(bundle), "--no-bench"])]
    if steps[-1]["rc"] == 0:
        steps.append(_step("verify", [MIXEXPORT, "verify", str(bundle), "--json"]))
        steps.append(_step("bench", [MIXEXPORT, "bench", str(bundle), "--candidates", args.candidates,
                                     "--budget", "3", "--json"]))
    files = _tree_bytes(bundle) if bundle.exists() else {}
    result = {
        "config": {"sub_keys": config.sub_keys, "slots": config.slots, "value_dim": config.value_dim,
                   "top_k": config.top_k, "memory_heads": config.memory_heads},
        "params": params, "value_table_bytes": table_bytes, "checkpoint_bytes": ckpt.stat().st_size,
        "checkpoint_seconds": round(made, 2), "steps": steps,
        "bundle_bytes": sum(files.values()), "bundle_files": files,
        "external_data": [f for f in files if f.endswith(".onnx.data")],
    }
    print(f"bundle: {result['bundle_bytes'] / 2**30:.3f} GiB in {len(files)} files, external data "
          f"{result['external_data']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    bench = next((s.get("result", {}) for s in steps if s["step"] == "bench"), {})
    results.save(args, "msn_large", started,
                 f"An MSN whose memory value table is {table_bytes / 2**30:.2f} GiB through mixexport build, verify "
                 "and bench, each step its own process: wall time and that process's peak resident memory, the "
                 "sizes on disk (ONNX weights in external data), and the bundle's latency.",
                 {"sizes": {**result["config"], "params": params, "value_table_gib": round(table_bytes / 2**30, 3),
                            "checkpoint_gib": round(result["checkpoint_bytes"] / 2**30, 3),
                            "checkpoint_s": result["checkpoint_seconds"],
                            "bundle_gib": round(result["bundle_bytes"] / 2**30, 3), "bundle_files": len(files),
                            "external_data": ", ".join(result["external_data"]) or "none"},
                  "steps": [{"step": s["step"], "exit_code": s["rc"], "wall_s": s["wall_s"],
                             "peak_rss_gib": s["peak_rss_gib"] if s["peak_rss_gib"] is not None else s["peak_rss_note"]}
                            for s in steps],
                  **({"latency": rows} if (rows := _latency_rows(bench)) else {})})
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    results.run(main)

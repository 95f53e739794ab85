#!/usr/bin/env python
"""HyFormer per-layer KV cache: cache hit vs cache miss vs no cache, ONNX Runtime CPU, one run.

    python benchmarks/hyformer_kv.py                       # base config, S = 1024, N = 64; writes
                                                           # benchmarks/results/hyformer_kv-base-swiglu.json
    python benchmarks/hyformer_kv.py --config tiny --seq-len 64 --candidates 16

Builds (random init, fixed seed; latency does not depend on the weights) a checkpoint of the
config, then two bundles through ``mixexport.pipeline.build``: one with ``extract-kv-cache`` (the
family default) and one with no passes. The bundles are built and verified at the schema's short
sample sequence (the sequence axis is dynamic) and timed at ``--seq-len`` by ``bench_bundle`` in
interleaved rounds in one process, so a noisy neighbour slows every runner alike:

- **no cache**: the bundle without passes: every candidate row runs both sequence encoders;
- **miss**: the KV bundle with a request that carries no user id: the cache segment encodes the
  user's sequences once per request, then the candidates read the K/V;
- **hit**: the same user and history again: only the user and item segments run;
- **append** (position-wise encoder only): every request adds one new behaviour.

The predicted FLOP ratios of the pass report are printed beside the measured ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import results

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/moe_pack.py: torch's spinning threads


def _mode(runner: str, label: str) -> str:
    """What a ``bench_bundle`` runner measures (it names them after the bundles)."""
    if runner.startswith("compare"):
        return "no cache (bundle without passes)"
    if runner == label:
        return "miss (KV bundle, request without user id)"
    return (runner.replace("eager", "eager torch").replace(f"{label} cache hit", "hit (same user, warm cache)")
            .replace(f"{label} cache append", "append, per request"))


def main(argv: list[str] | None = None) -> int:
    started = results.start()
    import torch

    from mixexport.bundle import read_manifest
    from mixexport.models import hyformer, save_checkpoint
    from mixexport.models.common import FeatureSchema
    from mixexport.pipeline import BuildOptions, build
    from mixexport.verification.run import bench_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="base", choices=("tiny", "base"))
    ap.add_argument("--encoder", default="swiglu", choices=hyformer.ENCODERS)
    ap.add_argument("--seq-len", type=int, default=1024, help="S of the timed requests")
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--sample-seq-len", type=int, default=128, help="S the bundles are built and verified at")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per runner")
    ap.add_argument("--work", type=Path, default=None, help="where to keep the checkpoint and bundles")
    ap.add_argument("--json", type=Path, default=None, help="also write the full report here")
    results.add_save_options(ap, "hyformer_kv-CONFIG-ENCODER")
    args = ap.parse_args(argv)

    config = getattr(hyformer, args.config)()
    schema = dataclasses.replace(config.schema, seq_len=max(args.sample_seq_len, config.recent))
    config = dataclasses.replace(config, schema=FeatureSchema(**dataclasses.asdict(schema)), encoder=args.encoder)
    work = args.work or Path(tempfile.mkdtemp(prefix="hyformer-kv-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = hyformer.Model(config).eval()
    params = sum(p.numel() for p in model.parameters())
    ckpt = save_checkpoint(model, work / "hyformer.pt")
    say = lambda m: print(f"· {m}", file=sys.stderr, flush=True)  # noqa: E731
    bundles = {}
    for name, passes in (("kv", None), ("none", ())):
        out = work / name
        if not (out / "manifest.json").exists():
            say(f"building the {name} bundle")
            build(ckpt, BuildOptions(out=out, passes=passes, bench=False, metrics=False, force=True), progress=say)
        bundles[name] = out
    manifest = read_manifest(bundles["kv"])
    kv_report = manifest.data["passes"][0]["report"]
    report = bench_bundle(bundles["kv"], checkpoint=ckpt, candidates=(args.candidates,), budget_s=args.budget,
                          compare=(bundles["none"],), cache_modes=True, seq_len=args.seq_len, progress=say)
    runners = {name: per[str(args.candidates)] for name, per in report["runners"].items()}
    p50 = {name: r["p50_ms"] for name, r in runners.items()}
    label = next(n for n in p50 if n.startswith("bundle") and "cache" not in n)
    miss, hit = p50[label], p50[f"{label} cache hit"]
    none = next(v for n, v in p50.items() if n.startswith("compare"))
    print(f"hyformer {args.config} ({params:,} parameters, encoder {args.encoder}), S = {args.seq_len}, "
          f"N = {args.candidates}, ONNX Runtime CPU; p50 over interleaved rounds in one run")
    for name, ms in p50.items():
        print(f"  {name:55s} {ms:10.2f} ms  ({runners[name]['runs']} runs)")
    print(f"  no cache / miss {none / miss:.2f}x, no cache / hit {none / hit:.2f}x, miss / hit {miss / hit:.2f}x")
    pred = kv_report["predicted_speedup"].get(str(args.candidates))
    if pred:
        print(f"  predicted from FLOPs at the sample S = {schema.seq_len}: no cache / miss "
              f"{pred['vs_unsplit_on_miss']:.2f}x, miss / hit {pred['hit_vs_miss']:.2f}x")
    print(f"  cache: {kv_report['cache']['bytes_per_position']} bytes per history position + "
          f"{kv_report['cache']['window_bytes_per_user']} bytes of recent-window K/V per user; "
          f"appendable: {manifest.data['caches'][0]['appendable']}")
    rows = [{"runner": _mode(n, label), "p50_ms": round(ms, 2), "p90_ms": round(runners[n]["p90_ms"], 2),
             "runs": runners[n]["runs"], "x_vs_no_cache": round(none / ms, 3)} for n, ms in p50.items()]
    setup = {"config": args.config, "encoder": args.encoder, "params": params, "seq_len": args.seq_len,
             "candidates": args.candidates, "cache_bytes_per_position": kv_report["cache"]["bytes_per_position"],
             "window_bytes_per_user": kv_report["cache"]["window_bytes_per_user"],
             "appendable": manifest.data["caches"][0]["appendable"]}
    if pred:
        setup.update({"predicted_sample_seq_len": schema.seq_len,
                      "predicted_x_no_cache_vs_miss": round(pred["vs_unsplit_on_miss"], 3),
                      "predicted_x_miss_vs_hit": round(pred["hit_vs_miss"], 3)})
    results.save(args, f"hyformer_kv-{args.config}-{args.encoder}", started,
                 f"HyFormer {args.config} ({args.encoder} encoder, {params:,} parameters) with the per-layer KV cache "
                 f"(extract-kv-cache) against the bundle without it, S = {args.seq_len}, N = {args.candidates}, "
                 "ONNX Runtime CPU: p50 over interleaved rounds in one run (x_vs_no_cache > 1 is faster); the "
                 "FLOP-predicted ratios are at the sample S the bundles were verified at.",
                 {"setup": setup, "latency": rows})
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "encoder": args.encoder, "params": params,
                                         "seq_len": args.seq_len, "candidates": args.candidates,
                                         "p50_ms": p50, "bench": report, "pass_report": kv_report}, indent=1))
    return 0


if __name__ == "__main__":
    results.run(main)

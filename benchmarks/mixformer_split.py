#!/usr/bin/env python
"""UI-MixFormer served split (user heads + sequence K/V once per user) vs unsplit, one run.

    python benchmarks/mixformer_split.py --work /tmp/mfb [--config base] [--candidates 16,64,256,1024]

Writes a random-init checkpoint of the config (accuracy does not matter for latency), builds the
split bundle (family default: ``split-user-item``) and the unsplit one (``--no-passes``), then times
1 user × N candidates for eager, both bundles in interleaved rounds (``mixexport bench --compare``'s
code path) and prints per N the p50s, the measured split/unsplit ratio and the split pass's predicted
FLOP saving ``N·F / (F_user + N·F_item)`` beside it, and writes
``benchmarks/results/mixformer_split-CONFIG.json`` (``--save NAME`` names it, ``--no-save`` skips it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import results

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mixexport bench`: before torch loads


def main(argv: list[str] | None = None) -> int:
    started = results.start()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="directory for the checkpoint and the two bundles")
    ap.add_argument("--config", choices=("tiny", "base"), default="base")
    ap.add_argument("--candidates", default="16,64,256,1024")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per N")
    ap.add_argument("--seed", type=int, default=0)
    results.add_save_options(ap, "mixformer_split-CONFIG")
    ap.add_argument("--reuse", action="store_true", help="time the bundles already in --work (no rebuild)")
    args = ap.parse_args(argv)

    import torch

    from mixexport.bundle import read_manifest
    from mixexport.models import mixformer, save_checkpoint
    from mixexport.pipeline import BuildOptions, build
    from mixexport.verification.run import bench_bundle

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = mixformer.Model(getattr(mixformer, args.config)()).eval()
    split, unsplit = work / "split", work / "unsplit"
    ckpt = work / f"mixformer-{args.config}.pt"
    if not args.reuse:
        save_checkpoint(model, ckpt, {"note": "random init, for latency"})
    for out, passes in ((split, None), (unsplit, ())) if not args.reuse else ():
        build(ckpt, BuildOptions(out=out, passes=passes, bench=False, metrics=False, force=True),
              progress=lambda m: print(m, file=sys.stderr))
    predicted = read_manifest(split).data["passes"][0]["report"]["predicted_speedup"]
    candidates = [int(n) for n in args.candidates.split(",")]
    report = bench_bundle(split, compare=[unsplit], candidates=candidates, budget_s=args.budget,
                          progress=lambda m: print(m, file=sys.stderr))
    runners = report["runners"]
    split_name = next(k for k in runners if k.startswith("bundle"))
    unsplit_name = next(k for k in runners if k.startswith("compare"))
    rows = []
    params = sum(p.numel() for p in model.parameters())
    print(f"mixformer {args.config}: {params:,} parameters; "
          f"1 user x N, p50 ms (median of interleaved rounds, one run)")
    print("| N | eager | unsplit | split | unsplit/split | predicted (FLOPs) |")
    print("|---|---|---|---|---|---|")
    for n in candidates:
        e, u, s = (runners[k][str(n)]["p50_ms"] for k in ("eager", unsplit_name, split_name))
        pred = predicted.get(str(n))
        rows.append({"candidates": n, "eager_p50_ms": round(e, 3), "unsplit_p50_ms": round(u, 3),
                     "split_p50_ms": round(s, 3), "x_split_vs_unsplit": round(u / s, 3),
                     "predicted_x_split_vs_unsplit": round(pred, 3) if pred is not None else None})
        print(f"| {n} | {e:.3g} | {u:.3g} | {s:.3g} | {u / s:.2f}x | "
              f"{'%.2fx' % pred if pred is not None else 'n/a'} |")
    results.save(args, f"mixformer_split-{args.config}", started,
                 f"UI-MixFormer {args.config} ({params:,} parameters), 1 user x N candidates on ONNX Runtime CPU: "
                 "the split bundle (split-user-item: user heads and sequence K/V once per request) against the "
                 "unsplit one and eager torch; p50 over interleaved rounds in one run, with the pass's "
                 "FLOP-predicted ratio beside the measured one (x_split_vs_unsplit > 1: the split is faster).", rows)
    return 0


if __name__ == "__main__":
    results.run(main)

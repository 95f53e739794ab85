#!/usr/bin/env python
"""UI-MixFormer served split (user heads + sequence K/V once per user) vs unsplit, one run.

    python benchmarks/mixformer_split.py --work /tmp/mfb [--config base] [--candidates 16,64,256,1024]

Writes a random-init checkpoint of the config (accuracy does not matter for latency), builds the
split bundle (family default: ``split-user-item``) and the unsplit one (``--no-passes``), then times
1 user × N candidates for eager, both bundles in interleaved rounds (``mixexport bench --compare``'s
code path) and prints per N the p50s, the measured split/unsplit ratio and the split pass's predicted
FLOP saving ``N·F / (F_user + N·F_item)`` beside it. ``--save FILE`` keeps the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="directory for the checkpoint and the two bundles")
    ap.add_argument("--config", choices=("tiny", "base"), default="base")
    ap.add_argument("--candidates", default="16,64,256,1024")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="also write the JSON result here")
    ap.add_argument("--reuse", action="store_true", help="time the bundles already in --work (no rebuild)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mixexport bench`: before torch loads

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
    print(f"mixformer {args.config}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"1 user x N, p50 ms (median of interleaved rounds, one run)")
    print("| N | eager | unsplit | split | unsplit/split | predicted (FLOPs) |")
    print("|---|---|---|---|---|---|")
    for n in candidates:
        e, u, s = (runners[k][str(n)]["p50_ms"] for k in ("eager", unsplit_name, split_name))
        rows.append({"candidates": n, "eager_p50_ms": e, "unsplit_p50_ms": u, "split_p50_ms": s,
                     "measured_speedup": u / s, "predicted_speedup": predicted.get(str(n))})
        pred = predicted.get(str(n))
        print(f"| {n} | {e:.3g} | {u:.3g} | {s:.3g} | {u / s:.2f}x | "
              f"{'%.2fx' % pred if pred is not None else 'n/a'} |")
    if args.save:
        Path(args.save).write_text(json.dumps({"rows": rows, "bench": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

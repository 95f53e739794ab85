#!/usr/bin/env python
"""split-user-item on models that are not mixers: a two-tower model (user tower >= 50 % of the FLOPs)
and a DIN (user tower + behaviour history in the user segment, target attention per candidate),
served split vs unsplit, one run.

    python benchmarks/split_nonmixer.py --work /tmp/snm [--candidates 16,256] [--budget 3]

Each model is our own implementation from the test corpus (tests/corpus/two_tower.py, din.py) at
serving-like widths, saved with torch.export.save as a user would, built twice (``--passes
split-user-item`` and ``--no-passes``), then timed by ``mixexport bench``'s code path
(``bench_bundle(split, compare=[unsplit])``: eager, split and unsplit in interleaved rounds). Per N it
prints the p50s, the measured unsplit/split ratio and the pass's FLOP prediction beside it, and writes
``benchmarks/results/split_nonmixer.json`` (``--save NAME`` names it, ``--no-save`` skips it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import results

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mixexport bench`: before torch loads

#: Serving-like widths (the corpus tests use tiny ones). two-tower: the user tower is ~95 % of the FLOPs.
MODELS = {
    "two_tower": {"seq": 50, "config": {"dim": 32, "dense": 4, "user_hidden": 512, "item_hidden": 64, "out": 64}},
    "din": {"seq": 50, "config": {"dim": 32, "dense": 4, "tower": 256, "att": 64}},
}


def main(argv: list[str] | None = None) -> int:
    started = results.start()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="directory for the programs and the bundles")
    ap.add_argument("--candidates", default="16,256")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per N")
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=0)
    results.add_save_options(ap, "split_nonmixer")
    args = ap.parse_args(argv)

    import torch

    from mixexport.bundle import read_manifest
    from mixexport.pipeline import BuildOptions, build
    from mixexport.verification.run import bench_bundle
    from tests.corpus import din, two_tower

    builders = {"two_tower": two_tower.build, "din": din.build}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    candidates = [int(n) for n in args.candidates.split(",")]
    rows = []
    print("1 user x N on ONNX Runtime CPU, p50 ms (median of interleaved rounds, one run)")
    print("| model | user share of FLOPs | N | eager | unsplit | split | unsplit/split | predicted (FLOPs) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        spec = MODELS[name]
        torch.manual_seed(args.seed)
        model, inputs, dynamic = builders[name](batch=4, seq=spec["seq"], **spec["config"])
        pt2 = work / f"{name}.pt2"
        ep = torch.export.export(model.eval(), (), kwargs=inputs, dynamic_shapes=dynamic, strict=False)
        torch.export.save(ep, pt2)
        split, unsplit = work / f"{name}-split", work / f"{name}-unsplit"
        for out, passes in ((split, ("split-user-item",)), (unsplit, ())):
            build(pt2, BuildOptions(out=out, passes=passes, bench=False, metrics=False, force=True),
                  progress=lambda m: print(m, file=sys.stderr))
        report = next(p["report"] for p in read_manifest(split).data["passes"] if p["name"] == "split-user-item")
        bench = bench_bundle(split, compare=[unsplit], candidates=candidates, budget_s=args.budget,
                             progress=lambda m: print(m, file=sys.stderr))
        gain = bench["split_gain"]["per_n"]
        share = report["user_share_of_flops"]
        params = sum(p.numel() for p in model.parameters())
        for n in candidates:
            g = gain[str(n)]
            eager = bench["runners"]["eager"][str(n)]["p50_ms"]
            rows.append({"model": name, "params": params, "seq_len": spec["seq"], "config": spec["config"],
                         "user_share_of_flops": round(share, 4), "candidates": n, "eager_p50_ms": round(eager, 3),
                         "unsplit_p50_ms": round(g["unsplit_p50_ms"], 3), "split_p50_ms": round(g["split_p50_ms"], 3),
                         "x_split_vs_unsplit": round(g["measured"], 3),
                         "predicted_x_split_vs_unsplit": round(g["predicted"], 3) if g["predicted"] else None})
            print(f"| {name} | {share:.0%} | {n} | {eager:.3g} | {g['unsplit_p50_ms']:.3g} | {g['split_p50_ms']:.3g} | "
                  f"{g['measured']:.2f}x | {g['predicted']:.2f}x |")
    load_end = os.getloadavg()
    print(f"load average at start {started.get('load_average_at_start')}, at end {tuple(round(x, 2) for x in load_end)}")
    results.save(args, "split_nonmixer", {**started, "load_average_at_end": [round(x, 2) for x in load_end]},
                 "split-user-item on non-mixers (our two-tower with a user tower >= 50 % of the FLOPs, and a DIN), "
                 "1 user x N candidates on ONNX Runtime CPU: the split bundle against the unsplit one and eager "
                 "torch, p50 over interleaved rounds in one run, with the pass's FLOP-predicted ratio beside the "
                 "measured one (x_split_vs_unsplit > 1: the split is faster).", rows)
    return 0


if __name__ == "__main__":
    results.run(main)

#!/usr/bin/env python
"""Unpacked vs packed Sparse-MoE bundles: ONNX Runtime latency for 1 user x N candidates.

    python benchmarks/moe_pack.py --family rankmixer-moe            # base config, N=256; writes
                                                                    # benchmarks/results/moe_pack-rankmixer-moe-base.json
    python benchmarks/moe_pack.py --family tokenmixer-large --config tiny --forms hidden-slice,stacked

Builds (random init, fixed seed) a checkpoint of the family's config, then one bundle with no passes
and one per packing form (``pack-moe-experts``), all through ``mixexport.pipeline.build`` with the
default ONNX Runtime session options. The bundles are timed in interleaved rounds in one process
(``time_interleaved``), so a noisy neighbour slows every runner alike; the eager model is timed too.
Besides wall-clock p50 it reports the CPU time of the calling thread per request with one
intra-op thread, which a shared machine disturbs much less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import results

# torch's OpenMP threads spin after each eager call and steal the cores from ONNX Runtime in the
# interleaved rounds (measured on 2 cores: eager 1,000 ms instead of 74 ms, bundles 2-3x slower);
# passive waiting must be set before torch is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _thread_cpu_ms(fn: Callable[[], Any], rounds: int) -> float:
    """Median CPU time of the calling thread for ``fn`` (ONNX Runtime with one intra-op thread
    runs its kernels on the calling thread, so this is the compute the request costs)."""
    import numpy as np

    fn()
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> int:
    started = results.start()
    import torch

    from mixexport.backends.onnxruntime import OrtSession
    from mixexport.bundle import read_manifest
    from mixexport.models import FAMILIES, save_checkpoint
    from mixexport.pipeline import BuildOptions, build
    from mixexport.runtime import Runtime
    from mixexport.source import load_source
    from mixexport.verification.latency import time_interleaved

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="rankmixer-moe", choices=("rankmixer-moe", "tokenmixer-large"))
    ap.add_argument("--config", default="base", choices=("tiny", "base"))
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--forms", default="hidden-slice", help="comma-separated pack-moe-experts forms")
    ap.add_argument("--budget-s", type=float, default=10.0, help="wall-clock timing budget")
    ap.add_argument("--cpu-rounds", type=int, default=20, help="single-thread CPU-time rounds per runner")
    ap.add_argument("--out", type=Path, default=None, help="keep bundles here (default: a temp dir)")
    results.add_save_options(ap, "moe_pack-FAMILY-CONFIG")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    mod = FAMILIES[args.family]
    model = mod.Model(getattr(mod, args.config)()).eval()
    work = args.out or Path(tempfile.mkdtemp(prefix="moe-pack-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(model, work / f"{args.family}-{args.config}.pt")
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.family} {args.config}: {params:,} parameters; bundles in {work}", file=sys.stderr)

    variants: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"unpacked": ((), ())}
    for form in filter(None, args.forms.split(",")):
        variants[f"packed ({form})"] = (("pack-moe-experts",), (f"pack-moe-experts.form={form}",))
    bundles, build_s, ops = {}, {}, {}
    for name, (passes, options) in variants.items():
        out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
        t0 = time.perf_counter()
        result = build(ckpt, BuildOptions(out=out, passes=passes, pass_options=options, bench=False,
                                          metrics=False, force=True))
        build_s[name] = time.perf_counter() - t0
        bundles[name] = out
        seg = result.manifest["segments"][0]
        ops[name] = {"MatMul": seg["ops"].get("MatMul", 0), "nodes": sum(seg["ops"].values()),
                     "parity_max_rel": result.parity["max_rel"]}
        print(f"built {name} in {build_s[name]:.0f}s: {ops[name]}", file=sys.stderr)

    source = load_source(ckpt)
    request = source.example_request(1, args.candidates, seed=7)
    runtimes = {name: Runtime.open(path) for name, path in bundles.items()}
    ref = Runtime.reference(source)
    fns: dict[str, Callable[[], Any]] = {"eager": lambda: ref.score(request, validate=False)}
    fns.update({name: (lambda rt=rt: rt.score(request, validate=False)) for name, rt in runtimes.items()})
    wall = time_interleaved(fns, budget_s=args.budget_s)
    for rt in runtimes.values():
        rt.close()

    # single-thread CPU time per request, each bundle's segment opened with its own session options
    feeds = request.rows()
    cpu = {}
    for name, path in bundles.items():
        manifest = read_manifest(path)
        seg = manifest.segments[0]
        opts = {**seg.session_options, "intra_op_num_threads": 1}
        session = OrtSession(manifest.file(seg.file), opts, "cpu")
        cpu[name] = _thread_cpu_ms(lambda s=session: s.run(feeds), args.cpu_rounds)

    base_wall, base_cpu = wall["unpacked"].p50_ms, cpu["unpacked"]
    print(f"\n{args.family} ({args.config}), 1 user x {args.candidates} candidates, ONNX Runtime CPU")
    print(f"{'runner':<26}{'p50 ms':>9}{'p90 ms':>9}{'vs unpacked':>13}{'1-thread CPU ms':>17}{'vs unpacked':>13}")
    for name, st in wall.items():
        c = cpu.get(name)
        print(f"{name:<26}{st.p50_ms:>9.2f}{st.p90_ms:>9.2f}{base_wall / st.p50_ms:>12.2f}x"
              + (f"{c:>17.2f}{base_cpu / c:>12.2f}x" if c is not None else ""))
    summary = {"family": args.family, "config": args.config, "candidates": args.candidates,
               "ops": ops, "build_s": build_s,
               "wall_p50_ms": {k: v.p50_ms for k, v in wall.items()}, "cpu_1thread_ms": cpu}
    print(json.dumps(summary, indent=1, default=str))
    rows = [{"runner": name, "p50_ms": round(st.p50_ms, 2), "p90_ms": round(st.p90_ms, 2),
             "x_vs_unpacked": round(base_wall / st.p50_ms, 3),
             **({"cpu_1thread_ms": round(cpu[name], 2), "cpu_x_vs_unpacked": round(base_cpu / cpu[name], 3),
                 "matmuls": ops[name]["MatMul"], "nodes": ops[name]["nodes"],
                 "parity_max_rel": ops[name]["parity_max_rel"], "build_s": round(build_s[name], 1)}
                if name in bundles else {})}  # eager has no bundle
            for name, st in wall.items()]
    results.save(args, f"moe_pack-{args.family}-{args.config}", started,
                 f"{args.family} {args.config} ({params:,} parameters), 1 user x {args.candidates} candidates on "
                 "ONNX Runtime CPU: the unpacked bundle against each pack-moe-experts form and eager torch. "
                 "p50/p90 wall clock over interleaved rounds in one process; cpu_1thread_ms is the calling "
                 f"thread's CPU time per request with one intra-op thread (median of {args.cpu_rounds}), which "
                 "a shared machine disturbs less (x_vs_unpacked > 1 is faster).", rows)
    return 0


if __name__ == "__main__":
    results.run(main)

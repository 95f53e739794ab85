#!/usr/bin/env python
"""OpenVINO as a target and as bench peers (issue 28): for each family's ``base()`` config, one
interleaved ``bench`` run at 1 user x N candidates of the openvino fp32 bundle against

- the ONNX Runtime fp32 bundle, the openvino bf16 and int8 bundles and the ONNX Runtime int8 bundle
  of the same checkpoint (``--compare``),
- every peer that needs no compile step: ``ort-default``, ``ort-quantize-dynamic``, ``openvino``
  (f32), ``openvino-default`` (OpenVINO's own precision), ``nncf-int8`` (``compile``/``aoti`` are
  left out: minutes of compiling on two cores, and not what this issue measures),

and records the max relative error of every runner against eager at N=256 next to its latency, so
"faster at no more error" can be read off one file. Checkpoints and bundles are made in ``--work``
when absent (random init: latency does not depend on training).

    python benchmarks/openvino_peers.py --work /tmp/ovb     # writes benchmarks/results/openvino_peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mixexport bench` (torch must not be loaded yet)

import numpy as np  # noqa: E402

from mixexport.machine import provenance, write_result  # noqa: E402

BUNDLES = (("openvino", "fp32"), ("onnx", "fp32"), ("openvino", "bf16"), ("openvino", "int8"), ("onnx", "int8"))
PEERS = ("ort-default", "ort-quantize-dynamic", "openvino", "openvino-default", "nncf-int8")


def bundle(work: Path, family: str, target: str, precision: str) -> Path:
    """``work/<family>.<target>.<precision>``, built (without bench) unless it exists."""
    from mixexport.models import FAMILIES, save_checkpoint
    from mixexport.pipeline import BuildOptions, build

    ckpt = work / f"{family}-base.pt"
    if not ckpt.exists():
        import torch

        torch.manual_seed(0)
        mod = FAMILIES[family]
        save_checkpoint(mod.Model(mod.base()).eval(), ckpt, {"note": "random init, base config, for benchmarks"})
    out = work / f"{family}.{target}.{precision}"
    if not out.exists():
        print(f"building {out.name}", file=sys.stderr, flush=True)
        build(ckpt, BuildOptions(out=out, target=target, precision=precision, bench=False))
    return out


def errors(family_bundles: dict[str, Path], n: int) -> dict[str, float]:
    """Max relative error vs eager of every bundle and peer on one 1 x ``n`` request."""
    from mixexport.runtime import Runtime
    from mixexport.source import load_source
    from mixexport.verification.peers import make_peers

    first = next(iter(family_bundles.values()))
    source = load_source(json.loads((first / "manifest.json").read_text())["model"]["source"]["path"])
    request = source.example_request(1, n, seed=7)
    name = source.outputs[0].name
    with Runtime.reference(source) as ref:
        want = ref.score(request)[name]

    def rel(got: np.ndarray) -> float:
        return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

    out = {}
    for label, path in family_bundles.items():
        with Runtime.open(path) as rt:
            out[label] = rel(rt.score(request)[name])
    for label, run in make_peers(list(PEERS), source, lambda _m: None).items():
        out[label] = rel(run(request)[0])
    return out


SUMMARY = ("OpenVINO as a target and as peers: the openvino fp32/bf16/int8 bundles, the ORT fp32 and int8 bundles, "
           "plain OpenVINO (f32 and its own default precision) and NNCF int8, 1 user x N, one interleaved run per family.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="checkpoints and bundles (made when absent)")
    ap.add_argument("--families", default="rankmixer,ugsep")
    ap.add_argument("--candidates", default="16,256")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of timing per N")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "openvino_peers.json")
    args = ap.parse_args()
    from mixexport.verification.run import bench_bundle

    args.work.mkdir(parents=True, exist_ok=True)
    started, families = provenance(), {}  # type: ignore[var-annotated]
    candidates = [int(c) for c in args.candidates.split(",")]
    for family in args.families.split(","):
        paths = {f"{t}.{p}": bundle(args.work, family, t, p) for t, p in BUNDLES}
        print(f"bench {family}", file=sys.stderr, flush=True)
        bench = bench_bundle(paths["openvino.fp32"], candidates=candidates, budget_s=args.budget, peers=PEERS,
                             compare=[p for k, p in paths.items() if k != "openvino.fp32"],
                             progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        families[family] = {"bundles": {k: str(p) for k, p in paths.items()}, "bench": bench,
                                      "max_rel_err_vs_eager_at_256": errors(paths, 256)}
        write_result(args.out, "openvino_peers", SUMMARY, started, families)  # after each family: a partial run counts
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

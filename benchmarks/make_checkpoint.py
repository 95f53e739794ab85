#!/usr/bin/env python
"""Write a randomly initialised checkpoint of a family's ``base()`` (or ``tiny()``) config, for
latency benchmarks where training would take long and accuracy does not matter.

    python benchmarks/make_checkpoint.py --family ugsep --config base --out ugsep-base.pt
"""

from __future__ import annotations

import argparse

import torch

from mixexport.models import FAMILIES, save_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--config", choices=("tiny", "base"), default="base")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    mod = FAMILIES[args.family]
    model = mod.Model(getattr(mod, args.config)()).eval()
    params = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, args.out, {"note": f"random init, {args.config} config, for latency benchmarks"})
    print(f"wrote {args.out}: {args.family} {args.config}, {params:,} parameters")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train a reference family on MovieLens-100k and save a mixexport checkpoint.

    python examples/train_movielens.py --family rankmixer --out rm.pt

The data comes from the recbole==1.2.1 wheel (``pip install --no-deps recbole==1.2.1``); see
``mixexport/data.py`` for the features and the time-ordered split. Prints the test AUC and logloss.
"""

from __future__ import annotations

import argparse
import sys

from mixexport.errors import MixexportError


def main(argv: list[str] | None = None) -> int:
    from mixexport.models import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--out", required=True, help="checkpoint path to write")
    ap.add_argument("--config", choices=("tiny", "base"), default="tiny")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seq-len", type=int, default=None, help="behaviour sequence length (default: the family's)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except MixexportError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from mixexport.data import movielens_100k
    from mixexport.models import FAMILIES, save_checkpoint
    from mixexport.training import train

    torch.manual_seed(args.seed)
    mod = FAMILIES[args.family]
    seq_len = args.seq_len or getattr(mod, "MOVIELENS_SEQ_LEN", 32)
    data = movielens_100k(seq_len=seq_len, behaviour_len=getattr(mod, "MOVIELENS_BEHAVIOUR_LEN", 0))
    config = getattr(mod, args.config)(schema=data.schema)
    model = mod.Model(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.family} ({args.config}, {params:,} parameters) on MovieLens-100k: {data.info['train_rows']} train "
          f"rows, {data.info['test_rows']} test rows ({data.info['test_users']} users)")
    result = train(model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   max_steps=args.max_steps)
    meta = {"dataset": data.name, "data": data.info, "trainer": "examples/train_movielens.py",
            "config_name": args.config, "train": {k: v for k, v in vars(args).items() if k != "out"},
            "test_auc": result["test_auc"], "test_logloss": result["test_logloss"],
            "seconds": result["seconds"], "config": dataclasses.asdict(config)}
    save_checkpoint(model, args.out, meta)
    print(f"test AUC {result['test_auc']:.4f}, test logloss {result['test_logloss']:.4f} "
          f"({result['seconds']:.0f}s); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

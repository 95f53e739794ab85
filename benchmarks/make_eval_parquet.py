"""Write labelled Parquet rows for a bundle: one column per bundle input (fixed-size lists for
multi-column and sequence inputs), ``user_key`` and ``label``; MovieLens-shaped when the bundle's
model was trained on MovieLens-100k, random within the input specs otherwise
(:mod:`mixexport.scale.synth`).

    python benchmarks/make_eval_parquet.py --bundle BUNDLE --rows 1000000 --files 8 --out eval/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from mixexport.scale.synth import write_eval_parquet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="the bundle whose inputs the rows feed")
    ap.add_argument("--rows", type=int, required=True, help="rows in all")
    ap.add_argument("--files", type=int, default=1, help="files, split at user boundaries")
    ap.add_argument("--out", required=True, help="directory to write part-NNNNN.parquet into")
    ap.add_argument("--candidates", type=int, default=16, help="mean candidates per user (random rows)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.rows < 1 or args.files < 1:
        ap.error("--rows and --files must be positive")
    paths = write_eval_parquet(args.bundle, args.out, args.rows, args.files, seed=args.seed,
                               candidates=args.candidates)
    print(f"wrote {args.rows} rows into {len(paths)} files under {args.out}")


if __name__ == "__main__":
    main()

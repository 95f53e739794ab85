#!/usr/bin/env python
"""Manifest fuzzing, the long run: random structural mutations of real bundles' ``manifest.json``
through ``verify``, ``inspect`` (text and ``--json``) and ``Runtime.open`` (see
:mod:`mixexport.testing.manifest_fuzz`). Every mutation must end cleanly: accepted, or refused with one
``error:`` line / a one-line MixexportError — never a traceback, an internal error or a hang.

    python scripts/fuzz_manifest.py --mutations 2000 --seed 1 --out manifest-fuzz.json
    python scripts/fuzz_manifest.py --bundle my-bundle/ --seed 1 --start 417 --mutations 1   # replay one

Without ``--bundle`` it builds three tiny bundles to mutate (a full ONNX segment, a LONGER
cache/user/item split, a UG-Sep user/item split compiled with AOTInductor) in a temporary
directory. Mutation ``k`` of a seed is the same on every machine. Bundles are mutated in place and
restored (work on copies of your own). Exit 0 when no mutation failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mixexport.testing.manifest_fuzz import CONSUMERS, timed_run


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, action="append", default=[], help="a bundle to mutate (repeatable)")
    ap.add_argument("--mutations", type=int, default=1000, help="mutations per bundle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="index of the first mutation (to replay one)")
    ap.add_argument("--verify-accepted", type=int, default=None,
                    help="run the full verify (parity) on at most this many mutations the other readers "
                         "accepted (default: on all of them)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a reader counts as hung")
    ap.add_argument("--out", type=Path, default=Path("manifest-fuzz.json"))
    return ap.parse_args()


def _build_bundles(root: Path) -> list[Path]:
    import torch

    from mixexport.models import FAMILIES, save_checkpoint
    from mixexport.pipeline import BuildOptions, build

    out = []
    for family, target in (("rankmixer", "onnx"), ("longer", "onnx"), ("ugsep", "aoti")):
        torch.manual_seed(0)
        mod = FAMILIES[family]
        ckpt = save_checkpoint(mod.Model(mod.tiny()).eval(), root / f"{family}.pt", {})
        print(f"building a tiny {family} bundle (--target {target})", file=sys.stderr)
        bundle = root / f"{family}-{target}"
        build(ckpt, BuildOptions(out=bundle, target=target, bench=False, metrics=False))
        out.append(bundle)
    return out


def main() -> int:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="mixexport-manifest-fuzz-") as tmp:
        bundles = args.bundle or _build_bundles(Path(tmp))
        report = {"seed": args.seed, "start": args.start, "bundles": {}}
        for bundle in bundles:
            print(f"fuzzing {bundle}: {args.mutations} mutations", file=sys.stderr)
            report["bundles"][str(bundle)] = timed_run(bundle, args.mutations, args.seed, start=args.start,
                                                       timeout_s=args.timeout, verify_accepted=args.verify_accepted)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    failed = 0
    for bundle, s in report["bundles"].items():
        failed += len(s["failures"])
        counts = "; ".join(f"{c}: " + ", ".join(f"{n} {k}" for k, n in s["consumers"][c].items() if n)
                           for c in CONSUMERS)
        print(f"{bundle}: {s['mutations']} mutations in {s['seconds']} s, {len(s['failures'])} failed ({counts})")
        for f in s["failures"]:
            print(f"  FAILED mutation {f['index']} ({f['kind']}: {f['where'][:100]}): "
                  + "; ".join(f"{c}: {o['detail'][-200:]!r}" for c, o in f["outcomes"].items()))
    print(f"report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

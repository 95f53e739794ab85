#!/usr/bin/env python
"""``.pt2`` fuzzing, the long run: random mutations of a real torch.export.save archive, each
loaded as ``inspect``/``build`` load it (see :mod:`mixexport.testing.pt2_fuzz`). Every mutation
must end in a clean load or a one-line refusal: never a traceback, a hang or code running (a
marker file). Every ``--cli-every``-th mutation also runs the ``mixexport inspect`` console script.

    python scripts/fuzz_pt2.py --mutations 6000 --seed 1 --out pt2-fuzz.json
    python scripts/fuzz_pt2.py --seed 1 --start 417 --mutations 1 --keep m.pt2   # replay one
    python scripts/fuzz_pt2.py --bombs --out benchmarks/results/pt2-bombs.json   # zip bombs' peak memory

Without ``--pt2`` it exports a small program to mutate. Mutation ``k`` of a seed is the same on
every machine. Exit 0 when no mutation failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mixexport.machine import provenance, write_result
from mixexport.testing import pt2_fuzz, pt2_mutations

BOMBS = ("Zip bombs in a .pt2: the time and the peak RSS growth of `inspect`'s load in a fresh process, for bombs "
         "that declare their true size and bombs whose declared sizes lie.")
FUZZ = ("The .pt2 fuzz: mutations of a real torch.export.save archive (members added, renamed, replaced by pickles "
        "in protocols 0-5 with a marker-file payload, recompressed, truncated), each loaded as inspect/build load it; "
        "a failure is a traceback, a hang or the marker file written.")


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pt2", type=Path, help="the archive to mutate (default: a small exported program)")
    ap.add_argument("--mutations", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="index of the first mutation (to replay one)")
    ap.add_argument("--cli-every", type=int, default=250, help="also run `mixexport inspect` on every Nth")
    ap.add_argument("--keep", type=Path, help="write the (last) mutated archive here")
    ap.add_argument("--bombs", action="store_true", help="only measure the peak memory of zip bombs")
    ap.add_argument("--out", type=Path, default=Path("pt2-fuzz.json"))
    return ap.parse_args()


def _bombs(base: Path, work: Path) -> list[dict]:
    """A 2 GiB bomb (a ~2 MB file, as in issue 23) with its true size and with lying sizes, and a
    256 MiB one: peak RSS growth of each load in a fresh process."""
    cases = [("2GiB-true-size", 2 << 30, None), ("2GiB-declares-1MiB", 2 << 30, 1 << 20),
             ("2GiB-declares-0", 2 << 30, 0), ("256MiB-true-size", pt2_mutations.BOMB_BYTES, None)]
    paths = [pt2_mutations.zip_bomb(base, work / f"{name}.pt2", size, declared) for name, size, declared in cases]
    rows = pt2_fuzz.peak_memory_of_loads(paths)
    for row, path in zip(rows, paths):
        row["file_bytes"] = path.stat().st_size
    return rows


def main() -> int:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="pt2-fuzz-") as tmp:
        work = Path(tmp)
        base = args.pt2 or pt2_fuzz.make_program(work / "base.pt2")
        started = provenance(["python", "scripts/fuzz_pt2.py", *sys.argv[1:]])
        if args.bombs:
            rows = _bombs(base, work)
            write_result(args.out, args.out.stem, BOMBS, started, rows)
            for r in rows:
                print(f"{Path(r['path']).name}: {r['file_bytes']} bytes, {r['seconds']:.3f} s, peak RSS growth "
                      f"{r['peak_growth_bytes'] / 2**20:.1f} MiB: {r['result'][:120]}")
            return 0
        marker = work / "MARKER"
        t = time.perf_counter()
        done = [0]

        def progress(o: pt2_fuzz.Outcome) -> None:
            done[0] += 1
            if o.result in ("crash", "code-ran", "hang"):
                print(f"#{o.index} {o.kind}: {o.result}: {o.detail[-600:]}", file=sys.stderr)
            if done[0] % 500 == 0:
                print(f"{done[0]} mutations, {time.perf_counter() - t:.0f} s", file=sys.stderr)

        report = pt2_fuzz.fuzz(base, work, marker, args.mutations, args.seed, args.start, args.cli_every,
                               progress=progress)
        if args.keep:
            (work / "mutant.pt2").replace(args.keep)
        seconds = time.perf_counter() - t
    library = [o for o in report.outcomes if not o.kind.endswith("/cli")]
    summary = {"mutations": len(library), "cli_runs": len(report.outcomes) - len(library),
               "seconds": round(seconds, 1), "outcomes": report.counts(), "by_kind": report.by_kind(),
               "failures": [o.__dict__ for o in report.failures]}
    write_result(args.out, args.out.stem, FUZZ, started, summary)
    print(json.dumps({k: summary[k] for k in ("mutations", "cli_runs", "seconds", "outcomes")}))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())

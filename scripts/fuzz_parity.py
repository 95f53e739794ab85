#!/usr/bin/env python
"""Fuzzed parity, the long run: random valid configs of every family × every applicable pass
combination × request shapes, each built, verified and scored (see :mod:`mixexport.testing.fuzz`).

    python scripts/fuzz_parity.py --cases 200 --seed 1 --out fuzz-report.json
    python scripts/fuzz_parity.py --seed 1 --start 37 --cases 1 --shrink    # re-run (and shrink) case 37
    python scripts/fuzz_parity.py --corpus --cases 40 --seed 1                # users' own programs (tests/corpus)

Case ``i`` of a seed is the same on every machine, so a failure is reproduced by ``--seed S
--start i --cases 1``. Progress goes to stderr, the summary to stdout, and the JSON report (per
case: config, request, result, errors with tracebacks) is rewritten after every case. Exit 0 when
every case passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout: mixexport and tests/corpus

from mixexport.testing.fuzz import (Case, combinations, describe, generate_cases, shrink,  # noqa: E402
                                    signature, summarize)
from mixexport.testing.program_fuzz import ProgramCase, generate_program_cases, run_any_case  # noqa: E402


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=None,
                    help="how many cases to try (default: every combination once, or every corpus entry once)")
    ap.add_argument("--corpus", action="store_true",
                    help="fuzz the corpus of users' own programs (tests/corpus: DIN, BST, DCN-v2, ...) instead "
                         "of the mixer families: each entry's .pt2 built with its passes, scored on ranged requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="index of the first case (to resume or re-run one)")
    ap.add_argument("--out", type=Path, default=Path("fuzz-report.json"))
    ap.add_argument("--families", default="", help="comma-separated families (default: all)")
    ap.add_argument("--with-pass", default=None, metavar="PASS",
                    help="only the combinations that include PASS (e.g. quantize-int8)")
    ap.add_argument("--limit", type=int, default=None,
                    help="draw only among the first LIMIT options of every choice (small configs)")
    ap.add_argument("--budget", type=float, default=None,
                    help="wall-clock seconds; no new case starts after that")
    ap.add_argument("--shrink", action="store_true", help="shrink every failure (greedy, re-builds)")
    ap.add_argument("--shrink-runs", type=int, default=30, help="most builds spent shrinking one failure")
    ap.add_argument("--jobs", type=int, default=1,
                    help="cases run at once in worker processes (a build is mostly single-threaded tracing)")
    ap.add_argument("--engines", default=None, metavar="BACKEND",
                    help="also build every case's segments with this TensorRT backend (tensorrt-rtx: no GPU needed)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where checkpoints and failing bundles go (default: a temporary directory)")
    args = ap.parse_args()
    if args.corpus:
        clash = [flag for flag, v in (("--families", args.families), ("--with-pass", args.with_pass),
                                      ("--limit", args.limit), ("--engines", args.engines), ("--shrink", args.shrink))
                 if v]
        if clash:
            ap.error(f"--corpus draws request shapes for fixed programs; {', '.join(clash)} applies to the families")
    return args


def _describe(case: Case | ProgramCase) -> str:
    return case.describe() if isinstance(case, ProgramCase) else describe(case)


def _write(path: Path, args: argparse.Namespace, results: list[dict[str, Any]], shrunk: list[dict[str, Any]],
           seconds: float) -> dict[str, Any]:
    summary = summarize(results)
    report = {"seed": args.seed, "start": args.start, "limit": args.limit, "seconds": round(seconds, 1),
              "summary": summary, "shrunk": shrunk, "results": results}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)
    return summary


def _print_summary(summary: dict[str, Any], seconds: float, shrunk: list[dict[str, Any]]) -> None:
    print(f"fuzzed parity: {summary['tried']} cases in {seconds:.0f} s: {summary['passed']} passed, "
          f"{summary['failed']} failed")
    print(f"{'family[passes]':52} tried passed failed")
    for label, row in summary["per_combination"].items():
        print(f"{label:52} {row['tried']:5} {row['passed']:6} {row['failed']:6}")
    for kind, info in summary["failure_kinds"].items():
        print(f"\n[FAIL] x{info['count']}: {kind}")
        for c in info["cases"][:3]:
            print(f"  {c['describe']}")
    for s in shrunk:
        print(f"\nshrunk ({s['shrink_runs']} builds): {describe(Case.from_json(s['case']))}\n  {signature(s)}")


def _run_all(cases: list[Case] | list[ProgramCase], work: Path, jobs: int, budget: float | None,
             t0: float, engines: str | None = None) -> Iterator[tuple[int, Case | ProgramCase, dict[str, Any]]]:
    """(index, case, result) as cases finish, ``jobs`` at a time; none starts after ``budget`` s."""
    def over() -> bool:
        return budget is not None and time.perf_counter() - t0 > budget

    if jobs <= 1:
        for i, case in enumerate(cases):
            if over():
                print(f"time budget reached after {i} cases", file=sys.stderr)
                return
            yield i, case, run_any_case(case, work, engines=engines)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: dict[Future, int] = {}
        nxt = 0
        while nxt < len(cases) or pending:
            while nxt < len(cases) and len(pending) < jobs and not over():
                pending[pool.submit(run_any_case, cases[nxt], work, False, engines)] = nxt
                nxt += 1
            if not pending:
                print(f"time budget reached after {nxt} cases", file=sys.stderr)
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                yield i, cases[i], future.result()


def main() -> int:
    args = _parse()
    families = [f for f in args.families.split(",") if f] or None
    cases: list[Case] | list[ProgramCase]
    if args.corpus:
        from tests.corpus import fuzz_entries

        entries = fuzz_entries()
        cases = generate_program_cases(entries, args.cases or len(entries), args.seed, start=args.start)
    else:
        cases = generate_cases(args.cases or len(combinations()), args.seed, args.limit, families, start=args.start,
                               with_pass=args.with_pass)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="mixexport-fuzz-")
    work = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    results: list[dict[str, Any]] = []
    shrunk: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        for i, case, result in _run_all(cases, work, args.jobs, args.budget, t0, args.engines):
            result["index"] = args.start + i
            results.append(result)
            status = "ok" if result["passed"] else "FAIL"
            print(f"[{args.start + i}] {status} {result['seconds']:.1f}s {_describe(case)}", file=sys.stderr)
            if not result["passed"]:
                print(f"    {signature(result)}", file=sys.stderr)
            results.sort(key=lambda r: r["index"])
            _write(args.out, args, results, shrunk, time.perf_counter() - t0)
        for result in results if args.shrink else []:
            if not result["passed"]:
                shrunk.append(shrink(result, work, args.shrink_runs,
                                     log=lambda m: print(f"    {m}", file=sys.stderr)))
    finally:
        if tmp is not None:
            tmp.cleanup()
    seconds = time.perf_counter() - t0
    summary = _write(args.out, args, results, shrunk, seconds)
    _print_summary(summary, seconds, shrunk)
    print(f"\nreport: {args.out}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

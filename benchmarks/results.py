"""One way every benchmark writes its numbers: ``benchmarks/results/<name>.json`` holding the
provenance (command, commit, date, CPU model and kernel flags, load average at start) and the
results. ``docs/benchmarks.md`` is generated from these files (``python scripts/gen_docs.py``);
no figure in the docs is typed by hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from mixexport.errors import MixexportError  # noqa: E402
from mixexport.machine import provenance, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def start() -> dict[str, Any]:
    """Call first thing in ``main()``: the provenance, with the load average before the run, and
    the versions of the engines the benchmarks time (read from the installed metadata, so nothing
    heavy is imported before the script sets its environment)."""
    versions = {}
    for lib in ("torch", "onnxruntime", "onnx"):
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    script = Path(sys.argv[0]).resolve()  # as typed from the checkout root, so the line can be rerun
    if script.is_relative_to(RESULTS.parent.parent):
        script = script.relative_to(RESULTS.parent.parent)
    return {**provenance(["python", str(script), *sys.argv[1:]]), "libraries": versions,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}


def _result_name(value: str) -> str:
    if not value or "/" in value or os.sep in value or value.endswith(".json") or value.startswith("."):
        raise argparse.ArgumentTypeError(f"expected a result name such as 'moe_pack-base', found {value!r}; "
                                         "the file is always benchmarks/results/NAME.json")
    return value


def add_save_options(ap: argparse.ArgumentParser, default: str) -> None:
    """``--save NAME`` (a run writes ``benchmarks/results/NAME.json``; ``default`` says what the
    script names it otherwise) and ``--no-save`` for trial runs."""
    ap.add_argument("--save", metavar="NAME", type=_result_name, default=None,
                    help=f"write benchmarks/results/NAME.json (default: {default})")
    ap.add_argument("--no-save", action="store_true", help="a trial run: write no result file")


def save(args: argparse.Namespace, default: str, started: dict[str, Any], summary: str, results: Any) -> None:
    """Write the result file named by ``--save`` (else ``default``) unless ``--no-save``; say where
    on stderr, so the printed numbers on stdout stay as they were."""
    if args.no_save:
        return
    print(f"wrote {write(args.save or default, started, summary, results)}", file=sys.stderr)


def time_rounds(fns: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, Any]:
    """Exactly ``rounds`` timed calls of each function, one call each per round, round after round
    (``time_interleaved`` with no budget and no warm-up: warm the functions first), so that a noisy
    neighbour slows every function alike. ``{name: LatencyStats}``."""
    from mixexport.verification.latency import time_interleaved

    return time_interleaved(fns, warmup=0, min_runs=rounds, max_runs=rounds, budget_s=0.0, block=1)


def write(name: str, started: dict[str, Any], summary: str, results: Any, path: Path | None = None) -> Path:
    """Write ``{"name", "summary", **started, "results"}`` atomically to ``benchmarks/results/<name>.json``
    (or ``path``); ``summary`` is one sentence saying what was measured (it heads the benchmark's
    section in ``docs/benchmarks.md``)."""
    return write_result(path or RESULTS / f"{name}.json", name, summary, started, results)


def run(main: Callable[[], int | None]) -> None:
    """``sys.exit(main())``, printing a :class:`MixexportError` (a bad bundle path, a pass that does
    not apply) as ``error:`` / ``hint:`` lines with its exit code, as the CLI does, not a traceback."""
    try:
        code = main()
    except MixexportError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(code or 0)

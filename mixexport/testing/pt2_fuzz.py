"""``.pt2`` fuzzing: random mutations (:mod:`mixexport.testing.pt2_mutations`) of a real
``torch.export.save`` archive, each loaded the way ``mixexport inspect`` and ``build`` load it
(:func:`mixexport.source.load_source`).

A ``.pt2`` is untrusted input, so every mutation must end in a clean load or a one-line
:class:`~mixexport.errors.BadInputError`; never another exception (a traceback), a hang, or code
running: every payload touches a marker file, which is checked after each mutation.

``scripts/fuzz_pt2.py`` is the long run; ``tests/test_pt2_safety.py`` runs a CI-sized slice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mixexport.testing.pt2_mutations import Mutator, read_members

@dataclass
class Outcome:
    index: int
    kind: str
    result: str           # "loaded" | "refused" | "crash" | "code-ran" | "hang"
    detail: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(o.result for o in self.outcomes))

    def by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            out.setdefault(o.kind, Counter())[o.result] += 1
        return {k: dict(v) for k, v in sorted(out.items())}

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result in ("crash", "code-ran", "hang")]

def make_program(path: Path) -> Path:
    """A small real program (user/item inputs, an embedding, a dynamic batch) saved with
    torch.export.save: the archive every mutation starts from."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4)
            self.mlp = torch.nn.Linear(4 + 3, 1)
            self.register_buffer("scale", torch.tensor([0.5]))

        def forward(self, user_id: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
            return self.mlp(torch.cat([self.emb(user_id), item_dense], 1)) * self.scale

    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(Tiny().eval(), (torch.randint(0, 20, (5,)), torch.randn(5, 3)),
                             dynamic_shapes={"user_id": {0: batch}, "item_dense": {0: batch}})
    torch.export.save(ep, path)
    return path

Loader = Callable[[Path], Any]


def _alarm(_signum: int, _frame: Any) -> None:
    raise TimeoutError("hang")


def run_one(path: Path, marker: Path, load: Loader, timeout_s: float = 120.0) -> tuple[str, str]:
    """Load one mutated archive; (result, detail)."""
    from mixexport.errors import BadInputError

    marker.unlink(missing_ok=True)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        load(path)
        result, detail = "loaded", ""
    except BadInputError as e:
        result, detail = "refused", e.message
        if "\n" in e.message:
            result, detail = "crash", "multi-line message: " + e.message[:300]
    except TimeoutError:
        result, detail = "hang", f"more than {timeout_s} s"
    except BaseException as e:  # noqa: BLE001 - anything else is what the fuzzer looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        result, detail = "crash", "".join(traceback.format_exception(e))[-2000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if marker.exists():
        marker.unlink()
        result, detail = "code-ran", f"the marker file was written ({result}: {detail[:200]})"
    return result, detail


def run_cli(path: Path, marker: Path) -> tuple[str, str]:
    """``mixexport inspect PATH`` in its own process: exit 0 or 2 with one error line, no code run."""
    marker.unlink(missing_ok=True)
    exe = Path(sys.executable).parent / "mixexport"
    p = subprocess.run([str(exe), "inspect", str(path)], capture_output=True, text=True, timeout=300)
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    if ran:
        return "code-ran", "inspect wrote the marker"
    if p.returncode == 0:
        return "loaded", ""
    if p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error: "):
        return "refused", p.stderr.splitlines()[0]
    return "crash", f"exit {p.returncode}: {p.stderr[-1500:]}"


def fuzz(base: Path, work: Path, marker: Path, mutations: int, seed: int = 0, start: int = 0,
         cli_every: int = 0, kinds: tuple[str, ...] | None = None,
         progress: Callable[[Outcome], None] | None = None) -> Report:
    """Run ``mutations`` mutations of ``base`` through load_source (and every ``cli_every``-th
    through the ``mixexport inspect`` console script too)."""
    from mixexport.source import load_source

    mutator = Mutator(read_members(base), marker)
    report = Report()
    path = work / "mutant.pt2"
    for k in range(start, start + mutations):
        kind_choice = None if kinds is None else kinds[k % len(kinds)]
        kind, raw = mutator.mutate(seed, k, kind_choice)
        path.write_bytes(raw)
        result, detail = run_one(path, marker, load_source)
        outcome = Outcome(k, kind, result, detail)
        report.outcomes.append(outcome)
        if cli_every and k % cli_every == 0:
            cli_result, cli_detail = run_cli(path, marker)
            if cli_result in ("crash", "code-ran") or (cli_result == "loaded") != (result == "loaded"):
                report.outcomes.append(Outcome(k, kind + "/cli", "crash" if cli_result != "code-ran" else cli_result,
                                               f"cli {cli_result}, library {result}: {cli_detail}"))
            else:
                report.outcomes.append(Outcome(k, kind + "/cli", cli_result, cli_detail))
        if progress:
            progress(outcome)
    return report


_PEAK_SCRIPT = """
import json, resource, sys, time
from pathlib import Path
import torch
from mixexport.errors import BadInputError
from mixexport.source import load_source

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None

for arg in sys.argv[1:]:
    try:  # Linux: "5" resets VmHWM (the peak RSS) to the current RSS, so each load gets its own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss_before = status("VmRSS")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    try:
        load_source(Path(arg)); result = "loaded"
    except BadInputError as e:
        result = "refused: " + e.message
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = status("VmHWM")
    print(json.dumps({"path": arg, "result": result, "seconds": seconds, "rss_before_bytes": rss_before,
                      "peak_rss_bytes": hwm, "peak_growth_bytes": (hwm - rss_before) if hwm and rss_before
                      else (after - before) * 1024,
                      "ru_maxrss_before_kib": before, "ru_maxrss_after_kib": after}))
"""


def peak_memory_of_loads(paths: list[Path]) -> list[dict[str, Any]]:
    """Load each of ``paths`` in turn in one fresh process (after ``import torch``); per path its
    result, time and peak RSS growth: the peak (VmHWM, reset before each load through
    ``/proc/self/clear_refs``) minus the RSS before the load; ``getrusage``'s ru_maxrss before and
    after are reported too (it is never reset, so it shows only growth past earlier peaks)."""
    p = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                       timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"the measuring process failed: {p.stderr[-1500:]}")
    return [json.loads(line) for line in p.stdout.strip().splitlines() if line.startswith("{")]

"""Latency of 1 user × N candidates (or U users), eager vs bundle in the same run.

Runners are timed in alternating blocks (eager ×k, bundle ×k, eager ×k, …) so that a noisy
neighbour slows both alike. Every block starts with untimed warm-up calls: after a torch call its
OpenMP threads keep spinning for a while (and ONNX Runtime's do too), which would otherwise be
charged to whichever runner comes next. Reported per runner and N:
p50/p90/p99/mean in milliseconds, candidates per second at p50, and the p50 ratio to eager.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np

DEFAULT_CANDIDATES = (1, 16, 64, 256, 1024)


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats:
        ms = np.asarray(seconds) * 1e3
        return cls(*(float(np.percentile(ms, q)) for q in (50, 90, 99)), float(ms.mean()), float(ms.min()), len(ms))


def time_interleaved(fns: Mapping[str, Callable[[], Any]], warmup: int = 2, min_runs: int = 5,
                     max_runs: int = 200, budget_s: float = 3.0, block: int = 5) -> dict[str, LatencyStats]:
    """Time each zero-argument function in alternating blocks of ``block`` timed calls, each block
    after ``warmup`` untimed calls, until ``budget_s`` (at least ``min_runs`` and at most
    ``max_runs`` timed calls per function)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        done = min(len(t) for t in times.values())
        if done >= max_runs or (done >= min_runs and time.perf_counter() - start >= budget_s):
            break
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(min(block, max_runs - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: LatencyStats.of(ts) for name, ts in times.items()}


def machine_info() -> dict[str, Any]:
    """The machine a latency figure was measured on: CPU model and kernel flags, load, libraries."""
    import onnxruntime
    import torch

    from mixexport.machine import cpu_info, load_average

    cpu = cpu_info()
    return {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cores": cpu["cores"],
            "load_average": load_average(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "platform": platform.platform()}


def summarize(results: dict[int, dict[str, LatencyStats]], baseline: str = "eager") -> dict[str, Any]:
    """JSON form: per runner, per N, stats + throughput + p50 ratio vs ``baseline``."""
    runners: dict[str, dict[str, Any]] = {}
    for n, per in results.items():
        base = per.get(baseline)
        for name, st in per.items():
            entry = asdict(st)
            entry["candidates_per_s"] = n / (st.p50_ms / 1e3) if st.p50_ms > 0 else float("inf")
            if base is not None:
                entry["speedup_vs_eager"] = base.p50_ms / st.p50_ms if st.p50_ms > 0 else float("inf")
            runners.setdefault(name, {})[str(n)] = entry
    return runners

"""What machine a number was measured on: the CPU model and the instruction-set flags that change
which kernels run (AVX2, AVX-512, VNNI, BF16, AMX), the core count and the load average.

CPU figures mean little without these: the same int8 bundle runs a different ONNX Runtime kernel on
an AVX2-only CPU than on one with VNNI. ``bench`` reports, the benchmarks' result files
(``benchmarks/results/*.json``) and the generated ``docs/benchmarks.md`` all take them from here.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# The flags that decide kernels for the engines we run (MLAS, oneDNN/OpenVINO, Inductor), in the
# spelling of Linux's /proc/cpuinfo.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags, ident = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.processor(), platform.machine()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key in ("cpu family", "model") and key not in ident:
                    ident[key] = value.strip()
    except OSError:  # not Linux: the model from platform, no flags
        pass
    if ident:  # "AMD EPYC" alone does not say Zen 3 from Zen 4: the family and model do
        model += f" (family {ident.get('cpu family', '?')}, model {ident.get('model', '?')})"
    return model, flags


def cpu_info() -> dict[str, Any]:
    """``{"model", "cores", "flags": [the KERNEL_FLAGS this CPU has]}``."""
    model, flags = _cpuinfo()
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in KERNEL_FLAGS if f in flags]}


def has_flags(*names: str) -> bool:
    """True when this CPU reports every flag in ``names`` (``/proc/cpuinfo`` spelling)."""
    _, flags = _cpuinfo()
    return all(n in flags for n in names)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit(root: Path | None = None) -> str | None:
    """The checkout's commit (``+dirty`` when it has uncommitted changes), or None outside a checkout."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def provenance(command: list[str] | None = None) -> dict[str, Any]:
    """Everything a result file needs to name where and how it was measured."""
    return {"command": " ".join(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu": cpu_info(),
            "load_average_at_start": load_average(),
            "python": platform.python_version(),
            "platform": platform.platform()}


def write_result(path: Path, name: str, summary: str, started: dict[str, Any], results: Any) -> Path:
    """Write one benchmark result file atomically: ``{"name", "summary", **started, "results"}``,
    ``started`` being :func:`provenance` taken when the run began. ``docs/benchmarks.md`` is generated
    from these files (``scripts/gen_docs.py``); ``summary`` is the sentence that heads its section."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"name": name, "summary": summary, **started, "results": results}, indent=2) + "\n")
    os.replace(tmp, path)
    return path

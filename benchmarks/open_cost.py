#!/usr/bin/env python
"""What the trust checks cost when a server opens a bundle: ``Runtime.open`` with and without
``verify_files`` (sha256 of every file it loads) and with no file check at all, plus the parts;
medians of ``--repeat`` rounds timed alternately in one process (the page cache is warm for all).

    python benchmarks/make_checkpoint.py --family rankmixer --config base --out /tmp/rmb.pt
    mixexport build /tmp/rmb.pt --out /tmp/rmb --no-bench --no-metrics
    python benchmarks/open_cost.py /tmp/rmb --repeat 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

from mixexport.bundle import Manifest, read_manifest
from mixexport.runtime import Runtime
from mixexport.trust import external_data_files, file_digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    m = read_manifest(args.bundle)
    loaded = [rel for seg in m.segments for rel in m.loaded_files(seg, seg.backend)]
    onnx_files = [seg.file for seg in m.segments]
    def unchecked() -> None:  # the open without any file check: sessions only (what it cost before)
        original = Manifest.check_loadable
        Manifest.check_loadable = lambda self, plan, hashes=True: None  # type: ignore[method-assign]
        try:
            Runtime.open(args.bundle).close()
        finally:
            Manifest.check_loadable = original  # type: ignore[method-assign]

    runners: dict[str, Callable[[], object]] = {
        "Runtime.open (verify_files=True)": lambda: Runtime.open(args.bundle).close(),
        "Runtime.open (verify_files=False)": lambda: Runtime.open(args.bundle, verify_files=False).close(),
        "Runtime.open without any file check": unchecked,
        "  sha256 of the loaded files": lambda: [file_digest(m.root / rel) for rel in loaded],
        "  external-data scan of the ONNX files": lambda: [external_data_files(m.root, rel) for rel in onnx_files],
        "  all checks (scan + sha256, overlapped)": lambda: m.check_loadable([(s, s.backend) for s in m.segments]),
        "  read_manifest (validation included)": lambda: read_manifest(args.bundle),
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():
        fn()  # warm: imports, page cache
    for _ in range(args.repeat):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    size = sum((m.root / rel).stat().st_size for rel in loaded)
    print(f"{args.bundle}: {len(loaded)} loaded file(s), {size / 1e6:.1f} MB; medians of {args.repeat} rounds")
    for name, ts in times.items():
        print(f"{name:42s} {1e3 * statistics.median(ts):8.1f} ms   (min {1e3 * min(ts):.1f})")


if __name__ == "__main__":
    main()

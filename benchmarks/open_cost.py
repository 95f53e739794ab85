#!/usr/bin/env python
"""What the trust checks cost when a server opens a bundle: ``Runtime.open`` with and without
``verify_files`` (sha256 of every file it loads) and with no file check at all, plus the parts;
medians of ``--repeat`` rounds timed alternately in one process (the page cache is warm for all).

    python benchmarks/make_checkpoint.py --family rankmixer --config base --out /tmp/rmb.pt
    mixexport build /tmp/rmb.pt --out /tmp/rmb --no-bench --no-metrics
    python benchmarks/open_cost.py /tmp/rmb --repeat 15      # writes benchmarks/results/open_cost-rankmixer.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import results

from mixexport.backends import get_backend
from mixexport.bundle import read_manifest
from mixexport.checked_load import read_segments
from mixexport.runtime import Runtime
from mixexport.trust import external_data_files, file_digest


def main() -> None:
    started = results.start()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--repeat", type=int, default=15)
    results.add_save_options(ap, "open_cost-FAMILY")
    args = ap.parse_args()
    m = read_manifest(args.bundle)
    loaded = [rel for seg in m.segments for rel in m.loaded_files(seg, seg.backend)]
    onnx_files = [seg.file for seg in m.segments]
    backends = {seg.name: get_backend(seg.backend) for seg in m.segments}

    def unchecked() -> None:  # no file check at all: ONNX Runtime sessions straight from the paths
        for seg in m.segments:
            if seg.backend != "onnxruntime":
                raise SystemExit(f"the baseline opens ONNX Runtime segments only, not {seg.backend}")
            backends[seg.name].open_file(m.file(seg.file), seg.session_options or None).close()

    runners: dict[str, Callable[[], object]] = {
        "Runtime.open (verify_files=True)": lambda: Runtime.open(args.bundle).close(),
        "Runtime.open (verify_files=False)": lambda: Runtime.open(args.bundle, verify_files=False).close(),
        "Runtime.open without any file check": unchecked,
        # the open before issue 23: hash the paths, then ONNX Runtime reopens them (a swap in between was loaded)
        "hash the paths, then ORT opens them": lambda: (m.check_loadable([(s, s.backend) for s in m.segments]),
                                                         unchecked()),
        "  sha256 of the loaded files": lambda: [file_digest(m.root / rel) for rel in loaded],
        "  read once + sha256 (what the open loads)": lambda: read_segments(m, backends),
        "  external-data scan of the ONNX files": lambda: [external_data_files(m.root, rel) for rel in onnx_files],
        "  all checks (scan + sha256, overlapped)": lambda: m.check_loadable([(s, s.backend) for s in m.segments]),
        "  read_manifest (validation included)": lambda: read_manifest(args.bundle),
    }
    for fn in runners.values():
        fn()  # warm: imports, page cache
    stats = results.time_rounds(runners, args.repeat)
    size = sum((m.root / rel).stat().st_size for rel in loaded)
    print(f"{args.bundle}: {len(loaded)} loaded file(s), {size / 1e6:.1f} MB; medians of {args.repeat} rounds")
    for name, st in stats.items():
        print(f"{name:42s} {st.p50_ms:8.1f} ms   (min {st.min_ms:.1f})")
    family = m.data["model"]["family"]
    bare = stats["Runtime.open without any file check"].p50_ms
    results.save(args, f"open_cost-{family}", started,
                 f"What opening a {family} bundle ({len(loaded)} loaded file(s), {size / 1e6:.1f} MB) costs with "
                 f"and without the trust checks, and the checks alone; medians of {args.repeat} alternating rounds "
                 "in one process, page cache warm.",
                 {"bundle": {"family": family, "params": m.data["model"].get("params"), "loaded_files": len(loaded),
                             "loaded_mb": round(size / 1e6, 1), "rounds": args.repeat},
                  "timings": [{"measured": name.strip(), "part_of_open": name.startswith(" "),
                               "p50_ms": round(st.p50_ms, 2), "min_ms": round(st.min_ms, 2),
                               "x_vs_open_without_checks": round(st.p50_ms / bare, 3)}
                              for name, st in stats.items()]})


if __name__ == "__main__":
    results.run(main)

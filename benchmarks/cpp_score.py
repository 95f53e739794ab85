#!/usr/bin/env python
"""C++ (mixexport_score_ort) vs Python Runtime latency on the same bundles and requests.

    python benchmarks/cpp_score.py [--repeat 200] [--build-dir build/cpp] [--work /tmp/cpp_score]

- rankmixer base (ONNX, one full segment): p50 of one scoring call at 1 user x 16 and x 256
  candidates, C++ vs Python ``Runtime.score``; and rankmixer tiny at 1 x 16, where the model's
  compute is small and the per-request overhead of each side shows;
- ugsep base (split user/item): p50 at 1 x 64 with the user state from the per-user cache (hit: the
  same user id and rows every call) vs computed every call (miss: a cache of 0 bytes keeps nothing),
  in C++ and in Python.

Both sides use the bundle's session options and ONNX Runtime's default thread pools; each side is
warmed up first (untimed calls for at least 0.5 s), and the sides alternate in rounds (the median
of the rounds' p50s is
reported). The C++ scorer is built with examples/cpp/build.sh (skipped when --build-dir holds it
already). Writes benchmarks/results/cpp_score.json (machine, load average, command, commit, date).

Where the time goes (the floors, timed in the same rounds): ``ort_run_p50_ms`` is ONNX Runtime's own
``Session.run`` on the segment's feeds, with no request check, gather or cache around it. Both sides
pay it (the same ONNX Runtime version, options and kernels), so ``python_p50 / ort_run`` bounds the
C++ speed-up (a C++ side with no overhead at all would reach it), and ``*_overhead_ms`` is what each
side adds to it. For the split bundle, ``user_segment_p50_ms`` and ``item_segment_p50_ms`` are the two
segments' runs: a cache hit skips only the user segment, so ``(user + item) / item`` bounds the
miss-over-hit latency ratio (``miss_over_hit_bound``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "cpp"))


def interleaved(sides: dict[str, Callable[[int], float]], repeat: int) -> dict[str, float]:
    """Each side's p50, measured in ROUNDS alternating rounds of repeat/ROUNDS calls each (the median
    of the rounds' p50s): a busy neighbour slows every side alike rather than whichever ran during it."""
    n = max(1, repeat // ROUNDS)
    rounds = [{name: fn(n) for name, fn in sides.items()} for _ in range(ROUNDS)]
    return {name: statistics.median(r[name] for r in rounds) for name in sides}


ROUNDS = 5


def cpp_p50(exe: Path, bundle: Path, request: Path, repeat: int, *extra: str) -> float:
    r = subprocess.run([str(exe), str(bundle), str(request), "--repeat", str(repeat), *extra],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"error: {exe.name} failed: {r.stderr.strip()[-500:]}")
    m = re.search(r"p50 ([0-9.]+) ms", r.stderr)
    if not m:
        raise SystemExit(f"error: no p50 in {exe.name}'s output: {r.stderr[-500:]}")
    return float(m.group(1))


#: untimed calls before the timed ones, on both sides (the C++ scorer's --repeat does the same): at
#: least WARMUP_CALLS, for at least WARMUP_S. A scorer called again after sitting idle, or new in its
#: process, runs its first ~100 calls ~20 % slower (rankmixer tiny 1x16: 0.42-0.53 ms after 5 calls,
#: 0.34-0.45 ms after 0.5 s), and a few calls alone would time that, not the scorer
WARMUP_CALLS, WARMUP_S = 5, 0.5


def p50(call: Callable[[], object], repeat: int) -> float:
    """p50 in ms of ``repeat`` calls, after the warm-up (:data:`WARMUP_S`)."""
    t0, k = time.perf_counter(), 0
    while k < WARMUP_CALLS or time.perf_counter() - t0 < WARMUP_S:
        call()
        k += 1
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def python_p50(runtime: object, request: object, repeat: int) -> float:
    return p50(lambda: runtime.score(request), repeat)  # type: ignore[attr-defined]


def segment_runs(runtime: object, request: object) -> dict[str, Callable[[], object]]:
    """One call per segment of ``runtime``: ONNX Runtime's ``InferenceSession.run`` on the feeds that
    segment got when ``request`` was scored (recorded through ``Runtime.trace``), nothing around it."""
    runtime.trace = {}  # type: ignore[attr-defined]
    runtime.score(request)  # type: ignore[attr-defined]
    feeds, runtime.trace = runtime.trace, None  # type: ignore[attr-defined]
    calls: dict[str, Callable[[], object]] = {}
    for name, seg_feeds in feeds.items():
        session = runtime.sessions[name].session  # type: ignore[attr-defined]
        outputs = [o.name for o in session.get_outputs()]
        calls[name] = lambda s=session, o=outputs, f=dict(seg_feeds): s.run(o, f)
    return calls


def bundle_for(family: str, work: Path, config: str = "base") -> Path:
    """A ``config`` (base or tiny) bundle of ``family`` (random init), built once into ``work``."""
    import torch

    from mixexport.models import FAMILIES, save_checkpoint
    from mixexport.pipeline import BuildOptions, build

    out = work / f"{family}-{config}"
    if not (out / "manifest.json").is_file():
        torch.manual_seed(0)
        mod = FAMILIES[family]
        ckpt = save_checkpoint(mod.Model(getattr(mod, config)()).eval(), work / f"{family}-{config}.pt",
                               {"note": "random init"})
        build(ckpt, BuildOptions(out=out, bench=False, metrics=False, force=True))
    return out


def main() -> int:
    started = results.start()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=200, help="timed calls per case (after a warm-up)")
    ap.add_argument("--build-dir", type=Path, default=ROOT / "build" / "cpp")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixexport-cpp-score"))
    results.add_save_options(ap, "cpp_score")
    args = ap.parse_args()

    from make_request import write_request_dir

    from mixexport.runtime import Runtime
    from mixexport.source import load_source

    exe = args.build_dir / "mixexport_score_ort"
    if not exe.is_file():
        subprocess.run([str(ROOT / "examples" / "cpp" / "build.sh"), str(args.build_dir)], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    args.work.mkdir(parents=True, exist_ok=True)
    out: dict[str, object] = {"repeat": args.repeat}

    # base: compute dominates; tiny: the per-request overhead (feeds, checks, session call) does
    for config, sizes in (("base", (16, 256)), ("tiny", (16,))):
        plain = bundle_for("rankmixer", args.work, config)
        source = load_source(args.work / f"rankmixer-{config}.pt")
        with Runtime.open(plain) as rt:
            for n in sizes:
                req = source.example_request(1, n, seed=n)
                req = type(req)(user=req.user, item=req.item, user_index=req.user_index, user_ids=None)
                d = write_request_dir(req, args.work / f"rankmixer-{config}-1x{n}")
                (run,) = segment_runs(rt, req).values()
                t = interleaved({"cpp": lambda k, d=d, b=plain: cpp_p50(exe, b, d, k),
                                 "python": lambda k, req=req, rt=rt: python_p50(rt, req, k),
                                 "ort_run": lambda k, run=run: p50(run, k)}, args.repeat)
                cpp, py, floor = t["cpp"], t["python"], t["ort_run"]
                out[f"rankmixer_{config}_1x{n}"] = {
                    "cpp_p50_ms": cpp, "python_p50_ms": py, "speedup": py / cpp, "ort_run_p50_ms": floor,
                    "cpp_overhead_ms": cpp - floor, "python_overhead_ms": py - floor, "speedup_bound": py / floor}
                print(f"rankmixer {config} 1x{n}: C++ p50 {cpp:.3f} ms, Python p50 {py:.3f} ms ({py / cpp:.2f}x); "
                      f"ONNX Runtime's run alone {floor:.3f} ms (bound {py / floor:.2f}x)")

    split = bundle_for("ugsep", args.work)
    req = load_source(args.work / "ugsep-base.pt").example_request(1, 64, seed=64)
    d = write_request_dir(req, args.work / "ugsep-1x64")
    with Runtime.open(split) as rt_hit, Runtime.open(split, cache_bytes=0) as rt_miss:
        runs = segment_runs(rt_miss, req)  # a miss runs both segments
        roles = {s.name: s.role for s in rt_miss.segments}
        t = interleaved({"cpp_hit": lambda k: cpp_p50(exe, split, d, k),
                         "cpp_miss": lambda k: cpp_p50(exe, split, d, k, "--cache-bytes", "0"),
                         "python_hit": lambda k: python_p50(rt_hit, req, k),
                         "python_miss": lambda k: python_p50(rt_miss, req, k),
                         **{roles[name]: (lambda k, run=run: p50(run, k)) for name, run in runs.items()}}, args.repeat)
    hit, miss, user, item = t["cpp_hit"], t["cpp_miss"], t["user"], t["item"]
    out["ugsep_base_1x64"] = {"cpp_hit_p50_ms": hit, "cpp_miss_p50_ms": miss, "cpp_miss_over_hit": miss / hit,
                              "python_hit_p50_ms": t["python_hit"], "python_miss_p50_ms": t["python_miss"],
                              "user_segment_p50_ms": user, "item_segment_p50_ms": item,
                              "miss_over_hit_bound": (user + item) / item}
    print(f"ugsep base 1x64: C++ hit p50 {hit:.3f} ms, miss {miss:.3f} ms ({miss / hit:.2f}x); "
          f"Python hit {t['python_hit']:.3f} ms, miss {t['python_miss']:.3f} ms; ONNX Runtime's runs alone: "
          f"user segment {user:.3f} ms, item segment {item:.3f} ms (bound {(user + item) / item:.2f}x)")
    out["load_average_at_end"] = list(os.getloadavg())
    results.save(args, "cpp_score", started,
                 "p50 of one scoring call, C++ mixexport_score_ort vs the Python Runtime on the same bundles "
                 "and requests (rankmixer base 1x16 and 1x256, tiny 1x16; ugsep base 1x64 user-cache hit vs miss)", out)
    return 0


if __name__ == "__main__":
    results.run(main)

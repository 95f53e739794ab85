#!/usr/bin/env python
"""``--target openvino`` at reduced precision, every family: metric parity on MovieLens-100k.

For each of the nine families: the tiny MovieLens model of ``benchmarks/table_parity.py`` (trained
40 steps; the same checkpoint file when ``--work`` is shared), built with its default passes for
``--target openvino`` at ``--precision bf16`` (on a CPU with bf16 GEMMs) and ``--precision int8``
(NNCF, on a CPU with VNNI). Each build's own verify scores the whole MovieLens test split against
the eager model; reported per family and precision: the build's status, ΔAUC, mean Kendall tau,
max rel err and the build time. A precision this CPU cannot run is reported as refused, with why.

    python benchmarks/openvino_auc.py [--families rankmixer,ugsep] [--precisions bf16,int8] [--reuse]

Goal (issue 28): |ΔAUC| <= 1e-3 for bf16 and int8 on every family. Writes
benchmarks/results/openvino_auc.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import results
from table_parity import trained

GOAL = 1e-3  # |ΔAUC| for bf16 and int8


def built(ckpt: Path, out: Path, precision: str, reuse: bool) -> dict[str, Any]:
    """Build for openvino at ``precision`` and return the parity report (a failed gate is kept and
    reported, with its failures), or ``{"refused": why}`` when this CPU cannot run the precision."""
    from mixexport.errors import EnvironmentUnavailableError, GateFailedError
    from mixexport.pipeline import BuildOptions, build

    report = out / "reports" / "parity.json"
    if reuse and report.is_file():
        return json.loads(report.read_text())
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        build(ckpt, BuildOptions(out=out, target="openvino", precision=precision, bench=False, keep_failed=True))
    except GateFailedError:
        pass  # the kept bundle's report says FAIL and why
    except EnvironmentUnavailableError as e:
        return {"refused": e.message}
    rep = json.loads(report.read_text())
    rep["build_s"] = round(time.perf_counter() - t0, 1)
    report.write_text(json.dumps(rep, indent=2) + "\n")
    return rep


def main() -> int:
    started = results.start()
    from mixexport.models import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all nine)")
    ap.add_argument("--precisions", default="bf16,int8")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixexport-table-parity"),
                    help="where the trained checkpoints are (shared with table_parity.py) and the bundles go")
    ap.add_argument("--reuse", action="store_true", help="reuse the builds a previous run left in --work")
    results.add_save_options(ap, "openvino_auc")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for family in args.families.split(","):
        ckpt = trained(family, args.work)
        row: dict[str, Any] = {}
        for precision in args.precisions.split(","):
            rep = built(ckpt, args.work / f"{family}-openvino-{precision}", precision, args.reuse)
            if "refused" in rep:
                row[precision] = {"refused": rep["refused"]}
                print(f"{family} {precision}: refused: {rep['refused']}", flush=True)
                continue
            m = rep["metrics"]
            delta = m["auc"]["delta"]
            row[precision] = {"status": rep["status"], "failures": rep.get("failures", []),
                              "eager_auc": m["auc"]["reference"], "auc": m["auc"]["bundle"], "delta_auc": delta,
                              "kendall_tau_mean": m["ranking"]["kendall_tau_mean"],
                              "kendall_tau_min": m["ranking"]["kendall_tau_min"], "gate": m.get("gate"),
                              "max_rel": rep.get("max_rel"), "rows": m.get("rows"), "build_s": rep.get("build_s"),
                              "meets_goal": abs(delta) <= GOAL}
            print(f"{family} {precision}: dAUC {delta:+.2e} tau {row[precision]['kendall_tau_mean']:.4f} "
                  f"({rep['status']})", flush=True)
        out[family] = row
    results.save(args, "openvino_auc", started,
                  "--target openvino at bf16 and int8 (NNCF), every family (tiny, 40 MovieLens training steps): "
                  "ΔAUC and Kendall tau against the eager model on the MovieLens-100k test split", out)
    return 0


if __name__ == "__main__":
    results.run(main)

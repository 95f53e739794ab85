"""The build's written output: the segments and tables, the backend's artifacts and the manifest,
the reports, and the commit behind the parity gate. Each step takes the :class:`BuildPlan` and the
:class:`~mixexport.bundle.BundleWriter` of the temporary directory (:mod:`mixexport.pipeline` calls them
in order).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from mixexport.bundle import SCHEMA_VERSION, Bundle, BundleWriter, library_versions
from mixexport.errors import GateFailedError
from mixexport.export import op_histogram, save_onnx, weight_bytes
from mixexport.stages import BuildPlan, stage_runtime


def write_segments(plan: BuildPlan, bundle: Bundle, writer: BundleWriter) -> dict[str, Any]:
    """The ONNX segments, the backend's artifacts (engines, AOTI packages), the sample request and
    the manifest (the files' sha256 are added at commit)."""
    options, backend, source = plan.options, plan.backend, plan.source
    plan.say("writing bundle")
    tables = write_tables(plan, bundle, writer)
    seg_json = []
    for seg in bundle.segments:
        files = save_onnx(seg.onnx, writer.path(f"segments/{seg.name}.onnx"), options.external_threshold)
        seg_json.append({**seg.to_json(), "file": f"segments/{seg.name}.onnx",
                         "data_files": [f"segments/{f.name}" for f in files[1:]],
                         "backend": backend.name, "engines": {},
                         "session_options": backend.session_options(),
                         "ops": op_histogram(seg.onnx), "weight_bytes": weight_bytes(seg.onnx),
                         **({"tables_version": tables["version"]} if tables else {})})
    if getattr(backend, "needs_calibration", False):  # OpenVINO int8: ranges from the float segments' feeds
        from mixexport.backends.openvino_int8 import calibration_feeds

        plan.say("int8: recording calibration feeds of every segment")
        backend.calibration = calibration_feeds(bundle, stage_runtime)
    engines = backend.compile(bundle, writer, plan.say)
    for entry in seg_json:
        entry["engines"] = engines.get(entry["name"], {})
        report = getattr(backend, "engine_reports", {}).get(entry["name"])
        if report:  # TensorRT: library, version, archs, profile, seconds, bytes, warnings
            entry["engine_build"] = report
    np.savez(writer.path("inputs/sample.npz"), **plan.request.to_npz_dict())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
        "model": {"family": source.family, "config": source.config, "params": source.params,
                  "source": source.info(), "roles": options.roles or None, "multiples": source.multiples,
                  "minimums": source.minimums, **({"maximums": source.maximums} if source.maximums else {}),
                  "inputs": [s.to_json() for s in source.inputs],
                  "outputs": [s.to_json() for s in source.outputs]},
        "target": options.target, "device": options.device, "precision": bundle.precision,
        "segments": seg_json, "caches": [c.to_json() for c in bundle.caches],
        "passes": [dataclasses.asdict(p) for p in bundle.passes],
        "notes": list(source.notes), "files": {},
        **({"tables": tables["tables"]} if tables else {}),
    }
    writer.write_json("manifest.json", manifest)
    return manifest


def write_tables(plan: BuildPlan, bundle: Bundle, writer: BundleWriter) -> dict[str, Any] | None:
    """externalize-embeddings: the tables' part files (streamed) and their manifest entries."""
    if not bundle.tables:
        return None
    from mixexport.tables.layout import tables_version
    from mixexport.tables.writer import write_tables

    plan.say(f"writing {len(bundle.tables)} tables")
    entries = write_tables(bundle.tables, writer.tmp)
    return {"tables": [e.to_json() for e in entries], "version": tables_version(entries)}


def write_reports(plan: BuildPlan, bundle: Bundle, writer: BundleWriter, parity: dict[str, Any],
                   latency: dict[str, Any] | None) -> None:
    from mixexport.verification.report import plot_latency, write_markdown

    writer.write_json("reports/parity.json", parity)
    if latency:
        writer.write_json("reports/latency.json", latency)
        plot_latency(latency, writer.path("reports/latency.png"))
    done = [p.name for p in bundle.passes]
    write_markdown(writer.path("reports/report.md"), f"mixexport bundle: {plan.source.family or plan.source.path.name}",
                   parity, latency, [f"Target `{plan.options.target}`, passes: {done or 'none'}.", ""])


def commit(plan: BuildPlan, bundle: Bundle, writer: BundleWriter, manifest: dict[str, Any],
            parity: dict[str, Any]) -> Path:
    """The parity summary into the manifest, the gate (no bundle unless parity passed, or
    ``--keep-failed``), then the atomic rename."""
    manifest["parity"] = {"status": parity["status"], "max_rel": parity["max_rel"],
                          "delta_auc": (parity["metrics"].get("auc") or {}).get("delta"),
                          "metrics": parity["metrics"].get("status")}
    if parity["status"] != "PASS" and not plan.options.keep_failed:
        hint = "see the stage ledger with --keep-failed, or loosen --atol/--rtol per output"
        quant = next((p.name for p in bundle.passes if p.name in ("quantize-w8a16", "quantize-int8")), None)
        if quant:  # top-k choices are discontinuous
            hint += (f"; a top-k choice (MoE experts, product-key memory slots) can change for inputs near a tie "
                     f"once upstream weights are int8: keep those layers in float (--option {quant}.skip=PATTERN)")
        lines = list(parity["failures"])
        metrics = parity["metrics"]
        if metrics.get("status") == "PASS":  # only tensors failed: say what the labelled data showed
            tau = (metrics.get("ranking") or {}).get("kendall_tau_mean")
            lines.append(f"metric parity PASS on labelled data: ΔAUC {metrics['auc']['delta']:+.2g}"
                         + (f", mean Kendall tau {tau:.4f}" if tau is not None else ""))
        raise GateFailedError("parity failed; no bundle written:\n  " + "\n  ".join(lines), hint)
    return writer.commit(manifest)

"""``verify`` and ``score`` over Parquet data sets: resolve the files, check them, run an engine,
merge, gate, write. The report holds only what does not depend on how the data was split."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from mixexport.errors import BadInputError
from mixexport.scale.files import check_files, expand, has_column, output_names
from mixexport.scale.schema import Columns
from mixexport.scale.sink import ScoreSink, Sink, VerifySink
from mixexport.scale.worker import Job

#: AUC bound each scoring must reach; above it a second pass counts the heaviest bins exactly.
DEFAULT_AUC_BOUND = 1e-6
DEFAULT_BATCH_ROWS = 65536
ENGINES = ("local", "ray")
Progress = Callable[[str], None]


def _engine(engine: str, files: list[str], job: Job, batch_rows: int, columns: list[str], sink: Sink,
            workers: int, address: str | None, ordered: bool) -> dict[str, Any]:
    if batch_rows < 1 or workers < 1:
        raise BadInputError(f"--batch-rows and --workers must be positive, found {batch_rows} and {workers}",
                            "pass e.g. --batch-rows 65536 --workers 2")
    if engine == "local":
        from mixexport.scale.local import run_local

        return run_local(files, job, batch_rows, columns, sink)
    if engine == "ray":
        from mixexport.scale.ray import run_ray

        return run_ray(files, job, batch_rows, columns, sink, workers, address, ordered)
    raise BadInputError(f"unknown engine {engine!r}", f"one of {', '.join(ENGINES)}")


def _check_tables(manifest: Any, tables: str | None, engine: str) -> None:
    """Open and close the table store once here when the workers are Ray actors, so that a wrong
    ``--tables`` (an unknown store, a cluster that is down, a version not published) is one line
    before Ray starts, not an actor's failure after it. The local engine's worker opens it at once."""
    if tables is None or engine != "ray":
        return
    from mixexport.tables.open import open_store

    lookups = open_store(manifest, tables, verify_files=False)  # check_integrity hashed the part files
    if lookups is not None:
        lookups.close()


def _threads(threads: int | None, engine: str) -> int:
    """One intra-op thread per worker by default, on both engines: the workers (Ray actors) spread
    the work over the cores, and ONNX Runtime's results can change in the last bit with its thread
    count, so the same count on every engine keeps their reports the same bytes."""
    return threads or 1


def _columns(files: list[str], specs: tuple[Any, ...], label: str | None, key: str | None,
             reference_column: str | None) -> tuple[Columns, list[str]]:
    """The columns to read; the label defaults to a ``label`` column when the first file has one."""
    if label is None and has_column(files[0], "label"):
        label = "label"
    cols = Columns(label=label, key=key, reference=reference_column)
    return cols, [s.name for s in specs] + cols.extra()


def verify_dataset(bundle: str | Path, data: str, *, label: str | None = None, key: str | None = None,
                   reference: str | None = None, reference_column: str | None = None, engine: str = "local",
                   address: str | None = None, workers: int = 1, batch_rows: int = DEFAULT_BATCH_ROWS,
                   atol: dict[str, float] | None = None, rtol: dict[str, float] | None = None,
                   auc_bound: float = DEFAULT_AUC_BOUND, threads: int | None = None,
                   progress: Progress | None = None, tables: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report, run facts) of metric and tensor parity on Parquet rows. The report is the same bytes
    (as :func:`dumps`) for any split of the data into files or batches, any engine or worker count."""
    from mixexport.bundle import check_integrity, read_manifest
    from mixexport.verification.run import AUC_GATE, TAU_GATE, bundle_tolerances

    say = progress or (lambda _m: None)
    if reference and reference_column:
        raise BadInputError("--reference and --reference-column both given", "compare against one of them")
    manifest = read_manifest(bundle)
    say("checking file hashes")
    check_integrity(manifest)
    files = expand(data)
    cols, read = _columns(files, manifest.inputs, label, key, reference_column)
    rows = check_files(files, manifest.inputs, cols)
    _check_tables(manifest, tables, engine)
    precision, per, default = bundle_tolerances(manifest, atol, rtol)
    tolerances = {"*": (default.rtol, default.atol), **{k: (t.rtol, t.atol) for k, t in per.items()}}
    job = Job(bundle=str(manifest.root), columns=cols, mode="verify", reference=reference, threads=_threads(threads, engine),
              tolerances=tolerances, tables=tables)
    say(f"scoring {rows} rows in {len(files)} files ({engine})")
    sink = VerifySink()
    facts = _engine(engine, files, job, batch_rows, read, sink, workers, address, ordered=False)
    plan = sink.totals.plan(auc_bound)
    if not plan.empty():
        say(f"AUC bound above {auc_bound:g}: counting {sum(len(b) for b in plan.bins.values())} bins exactly")
        refine = dataclasses.replace(job, refine=plan.bins)
        _engine(engine, files, refine, batch_rows, read, sink, workers, address, ordered=False)
        facts["refine_pass"] = True
    report = sink.totals.report(tolerances, plan, auc_bound)
    failures = [f"{k}: max_abs {t['max_abs']:.3g}, max_rel {t['max_rel']:.3g}, {t['outside']} of {t['elements']} "
                f"elements outside atol {t['atol']:g} + rtol {t['rtol']:g}·|e|"
                + (f", {t['nonfinite']} non-finite" if t["nonfinite"] else "")
                for k, t in report["tensor"].items() if not t["passed"]]
    m = report["metrics"]
    if m.get("status") != "skipped":
        gate = AUC_GATE.get(precision, AUC_GATE["fp32"])
        worst = abs(m["auc"]["delta"]) + m["auc"]["delta_bound"]
        m["gate"] = {"max_abs_delta_auc": gate, "passed": bool(worst <= gate)}
        if not m["gate"]["passed"]:
            failures.append(f"|ΔAUC| {abs(m['auc']['delta']):.3g} + bound {m['auc']['delta_bound']:.3g} > {gate:g}")
    if precision in TAU_GATE and report["ranking"]["requests_scored"]:
        tau = report["ranking"]["kendall_tau_mean"]
        if not tau >= TAU_GATE[precision]:
            failures.append(f"mean Kendall tau {tau:.4f} < {TAU_GATE[precision]:g}")
    bundle_precision = manifest.data.get("precision", "fp32")
    report = {"bundle_manifest_sha256": manifest.sha256, "precision": bundle_precision,
              **({"gate_precision": precision} if precision != bundle_precision else {}),
              "reference": f"column {reference_column}" if reference_column else "eager model",
              "status": "PASS" if not failures else "FAIL", **report, "failures": failures}
    facts.update(files=len(files), rows=rows)
    return report, facts


def dumps(report: dict[str, Any]) -> str:
    """The canonical text of a report: sorted keys, shortest round-trip floats."""
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the report atomically: a complete file or none."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(report))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def score_dataset(bundle: str | Path, data: str, out: str | Path, *, label: str | None = None,
                  key: str | None = None, engine: str = "local", address: str | None = None, workers: int = 1,
                  batch_rows: int = DEFAULT_BATCH_ROWS, threads: int | None = None,
                  progress: Progress | None = None, tables: str | None = None) -> dict[str, Any]:
    """Write one Parquet file of scores per input file into ``out`` (a new directory, renamed into
    place when every file is complete). Returns what was written. ``tables``: the store of a bundle
    with externalized tables (``Runtime.open``'s; every worker, Ray actors included, opens its own)."""
    from mixexport.bundle import check_integrity, read_manifest
    from mixexport.outdir import check_out, is_write_error, write_error

    say = progress or (lambda _m: None)
    manifest = read_manifest(bundle)
    files = expand(data)
    out = Path(out)
    inputs = {"bundle": manifest.root, **({"input": data} if Path(data).is_dir() else {}),
              **{f"input {f}": f for f in files}}
    check_out(out, False, inputs)
    say("checking file hashes")
    check_integrity(manifest)
    if label is None and all(has_column(f, "label") for f in files):  # the label when the data has one
        label = "label"
    cols, read = _columns(files, manifest.inputs, label, key, None)
    rows = check_files(files, manifest.inputs, cols)
    _check_tables(manifest, tables, engine)
    job = Job(bundle=str(manifest.root), columns=cols, mode="score", threads=_threads(threads, engine), tables=tables)
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise write_error(e, out) from None
    sink = ScoreSink(tmp, output_names(files))
    try:
        say(f"scoring {rows} rows in {len(files)} files ({engine})")
        facts = _engine(engine, files, job, batch_rows, read, sink, workers, address, ordered=True)
        sink.close()
        summary = {"bundle_manifest_sha256": manifest.sha256, "outputs": [s.name for s in manifest.outputs],
                   "files": [{"input": f, "output": sink.names[f], "rows": sink.written.get(f, 0)} for f in files]}
        (tmp / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
        os.rename(tmp, out)
    except OSError as e:
        sink.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e, out):
            raise write_error(e, out) from None
        raise
    except BaseException:
        sink.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, **facts, "rows": rows, "out": str(out)}

"""``mixexport verify``: integrity, tensor parity and metric parity of a bundle; with ``--data`` on
Parquet files, the same over a whole data set in bounded memory (:mod:`mixexport.scale`)."""

from __future__ import annotations

from typing import Any, Callable

import click

from mixexport.cli.options import (backend_option, checkpoint_option, device_option, emit_json, json_option, progress,
                                   tables_option, tolerance_options)

F = Callable[..., Any]


def scale_options(f: F) -> F:
    """The options of a data-set run, shared by ``verify --data *.parquet`` and ``score``."""
    for decorator in reversed((
        click.option("--label", default=None, metavar="COL",
                     help="Label column (0/1) of Parquet data (default: 'label' when the data has one)."),
        click.option("--key", default=None, metavar="COL",
                     help="User key column of Parquet data: a user's rows are consecutive within a file "
                          "(default: a change in any user-side input starts a new user)."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: one process, pyarrow; ray: Ray Data actors (pip install 'mixexport[ray]')."),
        click.option("--address", default=None, metavar="ADDR",
                     help="Ray cluster to attach to (default: start a local Ray with this machine's cores)."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Ray actors, each opening the bundle once."),
        click.option("--batch-rows", type=click.IntRange(min=1), default=65536, show_default=True,
                     help="Rows per batch (memory: a batch per worker, whatever the data's size)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Intra-op threads per worker (default 1: reports are the same bytes across engines "
                          "at the same count)."),
    )):
        f = decorator(f)
    return f


@click.command("verify")
@click.argument("bundle", type=click.Path())
@checkpoint_option
@backend_option
@device_option
@click.option("--no-metrics", is_flag=True, help="Skip metric parity on labelled data.")
@click.option("--data", default=None, metavar="PATH",
              help="Labelled data: an .npz (one array per input + 'label'), or Parquet: a file, a directory or a "
                   "glob such as 'eval/*.parquet' (default: MovieLens-100k for models trained on it).")
@scale_options
@click.option("--reference", default=None, metavar="CKPT_OR_PT2",
              help="Parquet data: the eager model to compare with (default: --checkpoint, or the manifest's path).")
@click.option("--reference-column", default=None, metavar="COL",
              help="Parquet data: compare with the logits already in this column (no eager model runs).")
@click.option("--auc-bound", type=click.FloatRange(min=0), default=1e-6, show_default=True,
              help="Parquet data: largest error bound on each AUC; above it a second pass counts the "
                   "heaviest histogram bins exactly.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Parquet data: write the report (JSON, the same bytes for any split of the data) here.")
@tolerance_options
@click.option("--manifest-sha256", "manifest_sha256", metavar="HEX", default=None,
              help="Refuse the bundle unless its manifest.json has this sha256 (as published with it).")
@tables_option
@json_option
@click.pass_context
def command(ctx: click.Context, bundle: str, checkpoint: str | None, backend: str | None, device: str,
            data: str | None, no_metrics: bool, label: str | None, key: str | None, engine: str,
            address: str | None, workers: int, batch_rows: int, threads: int | None, reference: str | None,
            reference_column: str | None, auc_bound: float, report_path: str | None, atol: tuple[str, ...],
            rtol: tuple[str, ...], manifest_sha256: str | None, tables: str | None, as_json: bool) -> int:
    """Check BUNDLE's files against its manifest, then its outputs against the eager model."""
    from mixexport.bundle import read_manifest
    from mixexport.verification.compare import parse_tolerances

    if data is not None and not data.endswith(".npz"):
        if backend is not None or device != "cpu" or no_metrics:
            from mixexport.errors import BadInputError

            raise BadInputError("--backend, --device and --no-metrics apply to .npz/MovieLens data only; Parquet "
                                "--data runs the bundle on CPU with the backend its manifest names",
                                "drop those options, or pass an .npz")
        if manifest_sha256:
            read_manifest(bundle, sha256=manifest_sha256)
        return _verify_parquet(ctx, bundle, data, label=label, key=key, reference=reference or checkpoint,
                               reference_column=reference_column, engine=engine, address=address, workers=workers,
                               batch_rows=batch_rows, threads=threads, auc_bound=auc_bound, report_path=report_path,
                               atol=parse_tolerances(atol, "atol"), rtol=parse_tolerances(rtol, "rtol"),
                               as_json=as_json, tables=tables)
    from mixexport.verification.run import verify_bundle

    with progress(ctx) as say:
        manifest = read_manifest(bundle, sha256=manifest_sha256)  # a bad path or pin: exit 1 before any work
        report = verify_bundle(manifest, checkpoint=reference or checkpoint, backend=backend, device=device, data=data,
                               metrics=not no_metrics, atol=parse_tolerances(atol, "atol"),
                               rtol=parse_tolerances(rtol, "rtol"), progress=say, tables=tables)
    if as_json:
        emit_json(report)
    else:
        _print_report(bundle, report)
    for line in report["failures"]:
        click.echo(f"FAIL {line}", err=True)
    return 0 if report["status"] == "PASS" else 1


def _print_report(bundle: str, report: dict[str, Any]) -> None:
    click.echo(f"{report['status']}: {bundle} on {report['backend']} ({report['device']}), "
               f"max relative error {report['max_rel']:.3g}")
    engines = report.get("engines")
    if engines and not engines["executed"]:
        click.echo(f"  {engines['backend']}: {engines['reason']}; checked instead: {engines['checked_instead']}")
    for seg, chk in (report.get("int8") or {}).get("engines", {}).items():
        click.echo(f"  int8 in the {seg} engine: {chk['status']} ({chk['engine_bytes']} B, "
                   f"{chk['ratio']}x its float twin's)")
    for t in report["tensor"]:
        worst = max(t["outputs"], key=lambda o: o["max_rel"])
        click.echo(f"  {t['request']:>14}: {t.get('status') or ('PASS' if t['passed'] else 'FAIL')} (worst {worst['name']}: "
                   f"max_abs {worst['max_abs']:.3g}, max_rel {worst['max_rel']:.3g})")
    if report.get("variation"):  # constant ids: the tensor gate above saw no difference it could catch
        click.echo(f"  warning: {report['variation']['message']}")
    m = report["metrics"]
    if m.get("status") in ("PASS", "FAIL"):
        click.echo(f"  metrics on {m['dataset']}: {m['status']} — AUC delta {m['auc']['delta']:.3g}, logloss delta "
                   f"{m['logloss']['delta']:.3g}, calibration delta {m['calibration']['delta']:.3g}, "
                   f"Kendall tau mean {m['ranking']['kendall_tau_mean']:.6f}")
    else:
        click.echo(f"  metrics skipped: {m.get('reason')}")


def _verify_parquet(ctx: click.Context, bundle: str, data: str, *, report_path: str | None, as_json: bool,
                    **options: Any) -> int:
    """verify on Parquet files: the streaming report, written to ``--report`` only when complete."""
    from mixexport.scale.run import dumps, verify_dataset, write_report

    with progress(ctx) as say:
        report, facts = verify_dataset(bundle, data, progress=say, **options)
    if report_path:
        write_report(report, report_path)
    if as_json:
        click.echo(dumps(report), nl=False)
    else:
        click.echo(f"{report['status']}: {bundle} on {facts['rows']} rows in {facts['files']} files "
                   f"({facts['engine']}, {facts['workers']} worker{'s' if facts['workers'] > 1 else ''})")
        for name, t in report["tensor"].items():
            click.echo(f"  {name}: {'PASS' if t['passed'] else 'FAIL'} max_abs {t['max_abs']:.3g}, "
                       f"max_rel {t['max_rel']:.3g}, {t['outside']} of {t['elements']} outside tolerance")
        m = report["metrics"]
        if m.get("status") == "skipped":
            click.echo(f"  metrics skipped: {m['reason']}")
        else:
            a = m["auc"]
            click.echo(f"  AUC eager {a['eager']:.9f} (±{a['eager_bound']:.2g}), bundle {a['bundle']:.9f} "
                       f"(±{a['bundle_bound']:.2g}), delta {a['delta']:.3g} (±{a['delta_bound']:.2g}); "
                       f"logloss delta {m['logloss']['delta']:.3g}, calibration delta {m['calibration']['delta']:.3g}")
        r = report["ranking"]
        if r["requests_scored"]:
            click.echo(f"  Kendall tau per request: mean {r['kendall_tau_mean']:.6f}, min {r['kendall_tau_min']:.6f} "
                       f"over {r['requests_scored']} requests")
    for line in report["failures"]:
        click.echo(f"FAIL {line}", err=True)
    return 0 if report["status"] == "PASS" else 1

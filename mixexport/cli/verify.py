"""``mixexport verify``: integrity, tensor parity and metric parity of a bundle."""

from __future__ import annotations

import click

from mixexport.cli.options import (backend_option, checkpoint_option, data_options, device_option, emit_json,
                                   json_option, progress, tolerance_options)


@click.command("verify")
@click.argument("bundle", type=click.Path())
@checkpoint_option
@backend_option
@device_option
@data_options
@tolerance_options
@click.option("--manifest-sha256", "manifest_sha256", metavar="HEX", default=None,
              help="Refuse the bundle unless its manifest.json has this sha256 (as published with it).")
@json_option
@click.pass_context
def command(ctx: click.Context, bundle: str, checkpoint: str | None, backend: str | None, device: str,
            data: str | None, no_metrics: bool, atol: tuple[str, ...], rtol: tuple[str, ...],
            manifest_sha256: str | None, as_json: bool) -> int:
    """Check BUNDLE's files against its manifest, then its outputs against the eager model."""
    from mixexport.bundle import read_manifest
    from mixexport.verification import verify_bundle
    from mixexport.verification.compare import parse_tolerances

    with progress(ctx) as say:
        manifest = read_manifest(bundle, sha256=manifest_sha256)  # a bad path or pin: exit 1 before any work
        report = verify_bundle(manifest, checkpoint=checkpoint, backend=backend, device=device, data=data,
                               metrics=not no_metrics, atol=parse_tolerances(atol, "atol"),
                               rtol=parse_tolerances(rtol, "rtol"), progress=say)
    if as_json:
        emit_json(report)
    else:
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
            click.echo(f"  {t['request']:>14}: {'PASS' if t['passed'] else 'FAIL'} (worst {worst['name']}: "
                       f"max_abs {worst['max_abs']:.3g}, max_rel {worst['max_rel']:.3g})")
        m = report["metrics"]
        if m.get("status") in ("PASS", "FAIL"):
            click.echo(f"  metrics on {m['dataset']}: {m['status']} — AUC delta {m['auc']['delta']:.3g}, logloss delta "
                       f"{m['logloss']['delta']:.3g}, calibration delta {m['calibration']['delta']:.3g}, "
                       f"Kendall tau mean {m['ranking']['kendall_tau_mean']:.6f}")
        else:
            click.echo(f"  metrics skipped: {m.get('reason')}")
    for line in report["failures"]:
        click.echo(f"FAIL {line}", err=True)
    return 0 if report["status"] == "PASS" else 1

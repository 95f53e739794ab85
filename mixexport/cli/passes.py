"""``mixexport passes``: every pass, in pipeline order, with its stage, options and documentation."""

from __future__ import annotations

import dataclasses

import click

from mixexport.cli.options import emit_json, json_option


@click.command("passes")
@json_option
def command(as_json: bool) -> int:
    """List the passes in the order the pipeline runs them."""
    from mixexport.passes.order import ORDER

    rows = [{"name": p.name, "stage": p.stage, "doc": p.doc,
             "options": {f.name: f.default for f in dataclasses.fields(p.options)}} for p in ORDER]
    if as_json:
        emit_json(rows)
        return 0
    if not rows:
        click.echo("no passes available")
    for r in rows:
        click.echo(f"{r['name']} ({r['stage']} stage)")
        click.echo("    " + r["doc"].replace("\n", "\n    "))
        opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items()) or "none"
        click.echo(f"    options: {opts}")
    return 0

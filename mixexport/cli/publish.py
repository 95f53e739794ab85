"""``mixexport publish``: a bundle's externalized tables into Redis Cluster, checked, then served.

Exit codes: 0 published (or already current) · 1 a read-back digest differs (not flipped) · 2 bad
input (no tables, bad URL) · 3 the cluster is unreachable (connection refused) or refused the
writes (out of memory); the current version is untouched in every failure.
"""

from __future__ import annotations

import dataclasses

import click

from mixexport.cli.options import emit_json, json_option


@click.command("publish")
@click.argument("bundle", type=click.Path())
@click.option("--store", required=True, metavar="redis://HOST:PORT[,HOST:PORT...]",
              help="The Redis Cluster (any reachable nodes; the rest are found from them).")
@click.option("--name", default=None, metavar="MODEL",
              help="Publish under this model name (default: the bundle's model family); serve with the same "
                   "name (?name=MODEL in the store URL).")
@click.option("--gc", is_flag=True, help="Then drop the versions that are neither current nor previous (after "
                                         "their grace period).")
@click.option("--grace", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="--gc's grace period: how long a retired version stays readable (default 300).")
@json_option
@click.pass_context
def command(ctx: click.Context, bundle: str, store: str, name: str | None, gc: bool, grace: float | None,
            as_json: bool) -> int:
    """Stream BUNDLE's tables into Redis Cluster, read back every bucket's digest, flip to them."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mixexport.tables.redis.publish import GRACE_S, publish

    quiet = (ctx.obj or {}).get("verbosity", 0) < 0 or as_json
    with Progress(TextColumn("publishing"), BarColumn(), TextColumn("{task.completed:,} rows"),
                  TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(), transient=True,
                  disable=quiet) as bar:
        task = bar.add_task("publish", total=None, rate="-")  # the total is known once the parts are checked
        start: list[float] = []

        def progress(done: int, total: int) -> None:
            import time

            now = time.perf_counter()
            if not start:
                start.append(now)
            rate = done / (now - start[0]) if now > start[0] else 0
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f}" if rate else "-")

        report = publish(bundle, store, name=name, gc=gc, grace_s=GRACE_S if grace is None else grace,
                         progress=progress)
    if as_json:
        emit_json(dataclasses.asdict(report))
        return 0
    click.echo(f"{report.action}: tables_version {report.version[:16]}… of {report.model!r} in {report.store}")
    if report.rows:
        click.echo(f"  {report.rows:,} rows in {report.seconds:.2f} s ({report.rows_per_s:,.0f} rows/s), "
                   f"{report.buckets} buckets; read back and matched in {report.read_back_s:.2f} s")
    if report.flip_ms:
        click.echo(f"  flipped current in {report.flip_ms:.2f} ms (previous: "
                   f"{report.previous[:16] + '…' if report.previous else 'none'})")
    for node, n in sorted(report.payload_bytes_per_node.items()):
        click.echo(f"  {node}: {n:,} bytes of rows, used_memory {report.used_memory_per_node.get(node, 0):,}")
    for v in report.dropped:
        click.echo(f"  dropped version {v[:16]}…")
    return 0

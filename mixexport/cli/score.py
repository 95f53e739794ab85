"""``mixexport score``: a bundle's outputs for every row of Parquet files, one output file per
input file (:mod:`mixexport.scale`)."""

from __future__ import annotations

import click

from mixexport.cli.options import emit_json, json_option, progress, tables_option
from mixexport.cli.verify import scale_options


@click.command("score")
@click.argument("bundle", type=click.Path())
@click.option("--data", required=True, metavar="PATH",
              help="Parquet rows: a file, a directory or a glob such as 'eval/*.parquet'.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="New directory for the scores: one Parquet file per input file (row, key, label, outputs).")
@scale_options
@tables_option
@json_option
@click.pass_context
def command(ctx: click.Context, bundle: str, data: str, out: str, label: str | None, key: str | None, engine: str,
            address: str | None, workers: int, batch_rows: int, threads: int | None, tables: str | None,
            as_json: bool) -> int:
    """Score every row of DATA with BUNDLE into OUT (written whole, or not at all)."""
    from mixexport.scale.run import score_dataset

    with progress(ctx) as say:
        result = score_dataset(bundle, data, out, label=label, key=key, engine=engine, address=address,
                               workers=workers, batch_rows=batch_rows, threads=threads, progress=say,
                               tables=tables)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"scored {result['rows']} rows of {len(result['files'])} files into {out} ({result['engine']})")
    return 0

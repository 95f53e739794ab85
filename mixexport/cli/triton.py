"""``mixexport triton``: a Triton Inference Server model repository for a bundle."""

from __future__ import annotations

from pathlib import Path

import click

from mixexport.cli.options import emit_json, json_option, tables_option


@click.command("triton")
@click.argument("bundle", type=click.Path())
@click.option("--out", type=click.Path(), required=True,
              help="The model repository directory to write (not the bundle, nor a directory holding it).")
@click.option("--flavour", type=click.Choice(["python", "native"]), default="python", show_default=True,
              help="python: one python-backend model serving the bundle through mixexport's Runtime (per-user "
                   "caches across requests); native: one onnxruntime_onnx / tensorrt_plan model per segment "
                   "and an ensemble.")
@click.option("--name", default=None, help="The served model's name (default: the bundle directory's name).")
@click.option("--instances", type=int, default=1, show_default=True,
              help="python flavour: model instances (each a process with its own caches).")
@click.option("--cache-bytes", type=int, default=None, help="python flavour: per-user cache bound per instance.")
@click.option("--max-batch-size", type=int, default=4096, show_default=True,
              help="native flavour, unsplit bundles: the dynamic batcher's largest batch.")
@click.option("--manifest-sha256", "manifest_sha256", metavar="HEX", default=None,
              help="Refuse the bundle unless its manifest.json has this sha256.")
@click.option("--force", is_flag=True,
              help="Replace an existing --out: only a repository mixexport wrote, or an empty directory.")
@tables_option
@json_option
def command(bundle: str, out: str, flavour: str, name: str | None, instances: int, cache_bytes: int | None,
            max_batch_size: int, manifest_sha256: str | None, force: bool, tables: str | None, as_json: bool) -> int:
    """Write a Triton model repository serving BUNDLE (every copied file checked against its sha256)."""
    from mixexport.runtime import DEFAULT_CACHE_BYTES
    from mixexport.serving.triton import TritonOptions, write_repository

    result = write_repository(bundle, TritonOptions(
        out=Path(out), flavour=flavour, name=name, instances=instances, force=force, max_batch_size=max_batch_size,
        tables=tables,
        cache_bytes=DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes), manifest_sha256=manifest_sha256)
    if as_json:
        emit_json(result)
        return 0
    click.echo(f"wrote {result['repository']}: {flavour} flavour of {result['bundle']}, served as "
               f"model {result['model']!r}")
    for m in result["models"]:
        click.echo(f"  {m['name']} ({m['kind']}): {len(m['files'])} files")
    for note in result["notes"]:
        click.echo(f"  note: {note}")
    return 0

"""``mixexport inspect``: what a checkpoint/.pt2 or a bundle holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mixexport.cli.options import emit_json, json_option
from mixexport.specs import describe


def inspect_source(path: str, timing: bool = True) -> dict[str, Any]:
    from mixexport.backends.onnxruntime import ort_build
    from mixexport.pipeline import preconditions
    from mixexport.program.precision_speed import measure_precisions
    from mixexport.source import load_source

    source = load_source(path)
    stages: dict[str, Any] = {}
    applicable = preconditions(source, stages)
    axes = sorted({d for s in source.inputs for d in s.shape if isinstance(d, str) and d.isidentifier()})
    return {"axes": {a: {"min": max(1, source.minimums.get(a, 1)), "max": source.maximums.get(a)} for a in axes},
            **({"precision_speed": measure_precisions(source, onnx=stages.get("onnx"))} if timing else {}),
            "kind": source.kind, "path": str(source.path), "sha256": source.sha256, "family": source.family,
            "tables": _table_plan(source), "config": source.config, "params": source.params, "metadata": source.metadata,
            "inputs": [s.to_json() for s in source.inputs], "outputs": [s.to_json() for s in source.outputs],
            "default_passes": list(source.default_passes), "passes": applicable, "notes": list(source.notes),
            "split_prediction": _split_prediction(applicable, stages),
            "onnxruntime": ort_build()}


def _split_prediction(applicable: dict[str, Any], stages: dict[str, Any]) -> dict[str, Any] | None:
    """Where split-user-item applies: its FLOPs per user and per candidate and predicted speed-up
    (passes/split_user_item.predict; ``bench --compare`` measures it)."""
    if applicable.get("split-user-item", "") is not None or "program" not in stages:
        return None
    from mixexport.passes.split_user_item import predict

    return predict(stages["program"])


def _table_plan(source: Any) -> dict[str, Any] | None:
    """What externalize-embeddings would take out at its default threshold (docs/tables.md)."""
    from mixexport.errors import PreconditionError
    from mixexport.passes.externalize_embeddings import plan, requires
    from mixexport.pipeline import initial_bundle

    bundle = initial_bundle(source)
    try:
        requires(bundle)
    except PreconditionError:
        return None
    return plan(bundle)


def inspect_bundle(path: str) -> dict[str, Any]:
    from mixexport.backends.onnxruntime import ort_build
    from mixexport.bundle import read_manifest

    m = read_manifest(path)
    # "onnxruntime": the build that would run it here (onnxruntime vs onnxruntime-gpu, providers)
    return {"kind": "bundle", "path": str(Path(path)), "manifest_sha256": m.sha256, **m.data,
            "onnxruntime": ort_build()}


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--no-timing", is_flag=True, help="Skip timing fp32, w8a16 and int8 on this CPU (a few seconds; "
                                                "checkpoints and .pt2 only).")
@json_option
def command(path: str, no_timing: bool, as_json: bool) -> int:
    """Show what PATH (a checkpoint, a .pt2 or a bundle directory) holds, and which passes apply."""
    info = inspect_bundle(path) if Path(path).is_dir() else inspect_source(path, timing=not no_timing)
    if as_json:
        emit_json(info)
        return 0
    from mixexport.backends.onnxruntime import describe_ort_build
    from mixexport.specs import TensorSpec

    if info["kind"] == "bundle":
        click.echo(f"bundle {info['path']}: {info['model'].get('family') or 'program'}, target {info['target']}, "
                   f"precision {info.get('precision')}, parity {(info.get('parity') or {}).get('status', '?')}")
        for seg in info["segments"]:
            click.echo(f"  segment {seg['name']} ({seg['role']}, {seg['backend']}): {seg['file']}")
            for s in seg["inputs"]:
                click.echo(f"    in  {describe(TensorSpec.from_json(s))}")
            for s in seg["outputs"]:
                click.echo(f"    out {describe(TensorSpec.from_json(s))}")
        for t in info.get("tables") or []:  # externalize-embeddings: served by the local table store
            click.echo(f"  table {t['name']} [{t['rows']:,} x {t['dim']}] {t['dtype']}, {t['partitions']} parts, "
                       f"for {', '.join(u['rows_input']['name'] for u in t['inputs'])}")
        click.echo(f"  passes: {', '.join(p['name'] for p in info['passes']) or 'none'}; "
                   f"{len(info['files'])} files with sha256")
        click.echo(f"  manifest sha256: {info['manifest_sha256']} (pin it: verify --manifest-sha256, "
                   "Runtime.open(manifest_sha256=))")
        click.echo(f"  runs here with {describe_ort_build(info['onnxruntime'])}")
        return 0
    click.echo(f"{info['kind']} {info['path']}: family {info['family'] or '(own program)'}, "
               f"{info['params']:,} parameters")
    for s in info["inputs"] + info["outputs"]:
        click.echo(f"  {describe(TensorSpec.from_json(s))}")
    for axis, r in info["axes"].items():
        click.echo(f"  axis {axis}: {r['min']}..{r['max'] if r['max'] is not None else 'unbounded'}")
    click.echo(f"  default passes: {', '.join(info['default_passes']) or 'none'}")
    for name, why in info["passes"].items():
        click.echo(f"  {name}: {'applies' if why is None else 'does not apply: ' + why}")
    split = info.get("split_prediction")
    if split:
        at = split["predicted_speedup"]
        click.echo(f"  split-user-item would run {split['user_share_of_flops']:.0%} of the FLOPs once per user: predicted "
                   + ", ".join(f"{v:.2f}x at 1 user x {n}" for n, v in at.items() if n in ("16", "256") and v))
    tables = info.get("tables")
    for t in (tables or {}).get("tables", []):
        click.echo(f"  table {t['name']} [{t['rows']:,} x {t['dim']}]: {t['bytes']:,} bytes, "
                   + ("goes out with externalize-embeddings" if t["out"] else f"stays in the graph: {t['why_not']}"))
    if tables:
        click.echo(f"  with externalize-embeddings (min_bytes {tables['min_bytes']:,}): "
                   f"{tables['dense_bytes_after']:,} bytes of weights in the segments, "
                   f"{tables['table_file_bytes']:,} in table part files")
    for note in info["notes"]:
        click.echo(f"  {note}" if note.startswith("warning:") else f"  note: {note}")
    speed = info.get("precision_speed")
    if speed:
        click.echo(f"  precision on this CPU ({speed['backend']}, 1 user x {speed['candidates']}, p50): "
                   + ", ".join(f"{p} {ms:.3g} ms" for p, ms in speed["p50_ms"].items()))
        for warning in speed["warnings"]:
            click.echo(f"  warning: {warning}")
    click.echo(f"  runs here with {describe_ort_build(info['onnxruntime'])}")
    return 0

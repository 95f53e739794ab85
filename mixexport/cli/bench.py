"""``mixexport bench``: latency of a bundle vs the eager model (and peers) in one run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from mixexport.cli.options import (backend_option, checkpoint_option, device_option, emit_json, json_option,
                                   parse_csv_ints, progress, tables_option)


@click.command("bench")
@click.argument("bundle", type=click.Path())
@checkpoint_option
@backend_option
@device_option
@click.option("--candidates", default="1,16,64,256,1024", show_default=True, help="N values (1 user x N).")
@click.option("--users", default=1, show_default=True, type=click.IntRange(min=1), help="Users per request.")
@click.option("--budget", default=2.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Seconds of timing per N (at least 5 rounds).")
@click.option("--peers", default="", metavar="P1,P2",
              help="Also time: compile (torch.compile), aoti, ort-default (stock ORT, fp32), "
                   "ort-quantize-dynamic (stock ORT int8), openvino (f32), openvino-default (OpenVINO's own "
                   "precision), nncf-int8 (NNCF int8); the last three need mixexport[openvino].")
@click.option("--compare", multiple=True, type=click.Path(), metavar="BUNDLE",
              help="Also time another bundle of the same model (e.g. built --no-passes), in the same run.")
@click.option("--cache-modes", is_flag=True, help="Also time per-user cache hits and appends (split/KV bundles).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Behaviour-sequence length of the requests (models with a dynamic sequence axis).")
@click.option("--save", type=click.Path(dir_okay=False), default=None, help="Also write the JSON result here.")
@tables_option
@json_option
@click.pass_context
def command(ctx: click.Context, bundle: str, checkpoint: str | None, backend: str | None, device: str,
            candidates: str, users: int, budget: float, peers: str, compare: tuple[str, ...], cache_modes: bool,
            seq_len: int | None, save: str | None, tables: str | None, as_json: bool) -> int:
    """Time BUNDLE and the eager model for 1 user x N candidates, N in --candidates."""
    # Runners share two cores in one process: with OpenMP's default waiting, torch's idle threads
    # spin after every eager call and slow the ONNX Runtime call timed next (measured: bundle
    # 174 -> 98 ms, eager unchanged when timed alone, rankmixer base at N=256). Must be set before
    # torch loads; an explicit setting from the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mixexport.backends.onnxruntime import describe_ort_build, ort_build
    from mixexport.verification.run import bench_bundle
    from mixexport.program.precision_speed import slower_than_fp32, with_fp32_peer
    from mixexport.verification.report import latency_markdown

    ort = ort_build()  # which ONNX Runtime build and providers time the bundle (onnxruntime vs -gpu)
    # a reduced-precision bundle is also timed against the model's fp32 ONNX: slower must be said
    peer_names, precision = with_fp32_peer(bundle, tuple(p for p in peers.split(",") if p), backend, device)
    with progress(ctx) as say:
        say(describe_ort_build(ort))
        report = bench_bundle(bundle, checkpoint=checkpoint, backend=backend, device=device,
                              candidates=parse_csv_ints(candidates, "--candidates"), users=users,
                              budget_s=budget, peers=peer_names, compare=compare,
                              cache_modes=cache_modes, seq_len=seq_len, progress=say, tables=tables)
    report = {**report, "onnxruntime": ort}
    report["precision_warnings"] = slower_than_fp32(report, precision)
    if save:
        Path(save).write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        emit_json(report)
    else:
        if device == "cuda" or ort["conflict"]:
            click.echo(describe_ort_build(ort))
        click.echo("\n".join(latency_markdown(report)))
        for warning in report["precision_warnings"]:
            click.echo(f"warning: {warning}")
        for name, st in (report.get("tables") or {}).get("cache", {}).items():
            click.echo(f"table {name} ({report['tables']['store']}): row cache hit rate {st['hit_rate']:.1%} "
                       f"of {st['lookups']} rows looked up")
    return 0

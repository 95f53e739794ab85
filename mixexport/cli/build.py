"""``mixexport build``: checkpoint or .pt2 → verified bundle directory."""

from __future__ import annotations

from pathlib import Path

import click

from mixexport.cli.options import (data_options, emit_json, json_option, parse_csv_ints, pass_options_option, progress,
                                   tolerance_options)

#: targets whose engines only run on a GPU: --device defaults to cuda for them
GPU_TARGETS = ("trt", "trt-rtx")


def _roles(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        name, eq, role = v.partition("=")
        if not eq or not name or not role:
            raise click.BadParameter(f"expected NAME=ROLE, found {v!r}", param_hint="--roles")
        out[name] = role
    return out


@click.command("build")
@click.argument("checkpoint", type=click.Path())
@click.option("--target", default="onnx", show_default=True,
              help="What the bundle runs on: onnx (ONNX Runtime), aoti (AOTInductor .pt2 packages), "
                   "trt (TensorRT >= 10 engines), trt-rtx (TensorRT for RTX engines), "
                   "openvino (OpenVINO IR on CPU; pip install \"mixexport[openvino]\").")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the bundle runs [default: cuda for trt/trt-rtx, else cpu].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "w8a16", "int8"]), default="fp32",
              show_default=True,
              help="Weights and compute of the exported model: fp16/bf16 floats, w8a16 (int8 weights, float "
                   "compute: adds the quantize-w8a16 pass, every ONNX target) or int8 (integer GEMMs on ONNX "
                   "Runtime CPU: adds the quantize-int8 pass); inputs/outputs stay float32.")
@click.option("--shapes", multiple=True, metavar="NAME:MIN,OPT,MAX",
              help="TensorRT optimization profile of a symbolic axis (batch, users, candidates…; repeatable).")
@click.option("--version-compatible", is_flag=True, help="TensorRT: build version-compatible engines.")
@click.option("--arch", default=None, metavar="SM,SM",
              help="TensorRT-RTX: compute capabilities to build engines for, e.g. sm86,sm120 "
                   "[default: sm80,sm86,sm89,sm120]. Building needs no GPU.")
@click.option("--passes", "passes_", default=None, metavar="P1,P2",
              help="Passes to apply (kebab case, see `mixexport passes`); default: the family's defaults.")
@click.option("--no-passes", is_flag=True, help="Apply no passes.")
@pass_options_option
@click.option("--out", type=click.Path(), default=None, help="Bundle directory (default: <checkpoint stem>.<target>).")
@click.option("--force", is_flag=True, help="Replace an existing --out once the new bundle is complete: only a "
                                            "bundle mixexport wrote, or an empty directory.")
@click.option("--roles", multiple=True, metavar="NAME=ROLE", help="Role of a .pt2 input: user, item or sequence.")
@data_options
@tolerance_options
@click.option("--no-bench", is_flag=True, help="Skip the build-time latency report.")
@click.option("--candidates", default="1,16,64,256,1024", show_default=True, help="N for the latency report.")
@click.option("--keep-failed", is_flag=True, help="Write the bundle even if parity fails (marked FAIL).")
@click.option("--dump-after", default=None, metavar="STAGE", help="Write the intermediate model after a pass or 'export'.")
@json_option
@click.pass_context
def command(ctx: click.Context, checkpoint: str, target: str, device: str | None, precision: str,
            shapes: tuple[str, ...], version_compatible: bool, arch: str | None, passes_: str | None, no_passes: bool,
            pass_options: tuple[str, ...], out: str | None, force: bool, roles: tuple[str, ...], data: str | None,
            no_metrics: bool, atol: tuple[str, ...], rtol: tuple[str, ...], no_bench: bool, candidates: str,
            keep_failed: bool, dump_after: str | None, as_json: bool) -> int:
    """Build a verified bundle from CHECKPOINT (a mixexport checkpoint or a torch.export .pt2)."""
    from mixexport.backends.tensorrt import parse_arch, parse_shapes
    from mixexport.pipeline import BuildOptions, build
    from mixexport.verification.compare import parse_tolerances

    if passes_ is not None and no_passes:
        raise click.UsageError("--passes and --no-passes exclude each other")
    names = () if no_passes else (None if passes_ is None else tuple(p.strip() for p in passes_.split(",") if p.strip()))
    device = device or ("cuda" if target in GPU_TARGETS else "cpu")
    opts = BuildOptions(out=Path(out) if out else Path(f"{Path(checkpoint).stem}.{target}"), target=target,
                        device=device, passes=names, pass_options=pass_options, force=force, roles=_roles(roles),
                        bench=not no_bench, bench_candidates=parse_csv_ints(candidates, "--candidates"),
                        metrics=not no_metrics, data=Path(data) if data else None,
                        atol=parse_tolerances(atol, "atol"), rtol=parse_tolerances(rtol, "rtol"),
                        keep_failed=keep_failed, dump_after=dump_after, precision=precision,
                        shapes=parse_shapes(shapes), version_compatible=version_compatible,
                        arch=parse_arch(arch))
    with progress(ctx) as say:
        result = build(checkpoint, opts, progress=say)
    parity = result.parity
    if as_json:
        emit_json({"out": str(result.out), "seconds": result.seconds, "manifest": result.manifest,
                   "parity": parity, "latency": result.latency})
    else:
        click.echo(f"wrote {result.out} in {result.seconds:.1f}s: {len(result.manifest['segments'])} segment(s), "
                   f"passes: {', '.join(p['name'] for p in result.manifest['passes']) or 'none'}")
        click.echo(f"parity {parity['status']}: max relative error {parity['max_rel']:.3g}")
        engines = parity.get("engines")
        if engines and not engines["executed"]:
            click.echo(f"{engines['backend']}: {engines['reason']}; parity checked on {engines['checked_instead']}")
        for seg in result.manifest["segments"]:
            eb = seg.get("engine_build")
            if eb:
                int8 = f", int8 kept: {eb['int8']['ratio']}x the float twin's bytes" if "int8" in eb else ""
                click.echo(f"  engine {seg['name']}: {eb['bytes'] / 1e6:.2f} MB in {eb['seconds']:.2f}s for "
                           f"{','.join(eb['archs'])} ({eb['library']} {eb['version']}){int8}")
        m = parity["metrics"]
        if m.get("status") in ("PASS", "FAIL"):
            click.echo(f"metrics on {m['dataset']}: AUC {m['auc']['reference']:.5f} -> {m['auc']['bundle']:.5f} "
                       f"(delta {m['auc']['delta']:.2g}), logloss delta {m['logloss']['delta']:.2g}")
        else:
            click.echo(f"metrics skipped: {m.get('reason')}")
        if result.latency:
            runners = result.latency["runners"]
            bundle_name = next(k for k in runners if k != "eager")
            for n in result.latency["candidates"]:
                e, b = runners["eager"][str(n)], runners[bundle_name][str(n)]
                click.echo(f"  1 user x {n:>5}: eager p50 {e['p50_ms']:.3g} ms, bundle p50 {b['p50_ms']:.3g} ms "
                           f"({b['speedup_vs_eager']:.2f}x)")
    return 1 if parity["status"] != "PASS" else 0

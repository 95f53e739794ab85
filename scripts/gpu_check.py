"""One command for the H100 test machine (README: "Targets and where they were verified"): for every
family's base config in ``mixexport.models.FAMILIES``,

- builds an AOTI-CUDA bundle (``--aoti-precision``, default bf16) and an ORT-CUDA bundle
  (``--ort-precision``, default fp16: ORT's CUDA bf16 coverage is partial) through the real
  ``mixexport`` pipeline, which verifies parity against the fp32 eager model;
- times, at every B in ``--batches`` (default 64, 512, 2048) flat rows, on device tensors: eager bf16
  (the bf16-cast ``torch.export`` program run op by op), ``torch.compile`` of the same, the AOTI
  package and ONNX Runtime's CUDA provider (IO binding), each with its error vs eager fp32 and its
  MFU = useful FLOPs (matmuls, counted by ``FlopCounterMode``) / time / ``--peak-tflops`` (989, the
  H100's dense bf16 peak);
- parses and builds every ONNX segment with TensorRT-RTX (``tensorrt_rtx_bindings``; it builds on an
  H100 but refuses to run there, so nothing is run).

Results go to ``<out>/gpu_check.json`` (``--out``, default ``$OUT``). Exit code 0 when every build
passed parity and nothing failed, 1 otherwise; failures are recorded per item, never hidden.

On the H100 (no network; bring the wheels)::

    pip install --no-deps --no-build-isolation -e . && python scripts/gpu_check.py

CPU dry run on tiny configs (what the CI test runs)::

    python scripts/gpu_check.py --device cpu --tiny --batches 4 --budget 0.05 --out /tmp/gc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

H100_BF16_TFLOPS = 989.0


def timed(fn: Callable[[], Any], device: str, budget_s: float, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` (at least 5 runs, more while within ``budget_s``)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def attempt(record: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on failure record the error under ``key`` (and in ``errors``) and return None."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing item must not lose the rest of a GPU run
        record.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {str(e).strip()[:400]}")
        traceback.print_exc(file=sys.stderr)
        return None


def flops_per_row(model: Any, source: Any, rows: int = 8) -> float:
    """Useful FLOPs of one row: what FlopCounterMode counts (matmuls, linears) in an fp32 forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    feeds = {k: torch.from_numpy(v) for k, v in source.example_feeds(rows, seed=1).items()}
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(**feeds)
    return counter.get_total_flops() / rows


def build_bundle(ckpt: Path, out: Path, target: str, device: str, precision: str) -> dict[str, Any]:
    from mixexport.pipeline import BuildOptions, build

    t0 = time.perf_counter()
    result = build(ckpt, BuildOptions(out=out, target=target, device=device, precision=precision,
                                      bench=False, metrics=False, force=True))
    return {"path": str(out), "target": target, "precision": precision, "build_s": time.perf_counter() - t0,
            "parity": result.parity["status"], "max_rel": result.parity["max_rel"],
            "failures": result.parity["failures"]}


def ort_runner(onnx_path: Path, device: str, output: str) -> Callable[[dict[str, Any]], Any]:
    """ONNX Runtime on device tensors: CUDA provider with IO binding, or the CPU provider."""
    import onnxruntime as ort

    if device != "cuda":
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run([output], {k: v.numpy() for k, v in feeds.items()})[0]
    sess = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])

    def run(feeds: dict[str, Any]) -> Any:
        binding = sess.io_binding()  # inputs stay on the GPU: no host copies inside the timing
        for name, t in feeds.items():
            dtype = np.dtype(str(t.dtype).replace("torch.", ""))  # float32 / int64 interface tensors
            binding.bind_input(name, "cuda", 0, dtype, list(t.shape), t.data_ptr())
        binding.bind_output(output, "cuda")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run


def runtime_runner(bundle: Path, device: str, source: Any, output: str) -> Callable[[dict[str, Any]], Any]:
    """The bundle through mixexport's runtime: B flat rows as a request of B users x B candidates."""
    from mixexport.runtime import Runtime
    from mixexport.specs import Request

    rt = Runtime.open(bundle, device=device)
    user_side = {s.name for s in source.inputs if s.user_side}

    def run(feeds: dict[str, Any]) -> Any:
        rows = {k: v.cpu().numpy() for k, v in feeds.items()}
        n = next(iter(rows.values())).shape[0]
        req = Request(user={k: v for k, v in rows.items() if k in user_side},
                      item={k: v for k, v in rows.items() if k not in user_side},
                      user_index=np.arange(n, dtype=np.int64))
        return rt.score(req, validate=False)[output]

    return run


def check_family(name: str, mod: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from mixexport.models import save_checkpoint
    from mixexport.precision import cast_bundle
    from mixexport.source import load_source

    torch.manual_seed(0)
    config = mod.tiny() if args.tiny else mod.base()
    model = mod.Model(config).eval()
    ckpt = save_checkpoint(model, work / f"{name}.pt")
    source = load_source(ckpt)
    rec: dict[str, Any] = {"config": "tiny" if args.tiny else "base", "params": source.params}
    rec["flops_per_row"] = attempt(rec, "flops", lambda: flops_per_row(model, source))
    dev = args.device
    rec["aoti"] = attempt(rec, "aoti build", lambda: build_bundle(ckpt, work / f"{name}.aoti", "aoti", dev,
                                                                  args.aoti_precision))
    rec["ort"] = attempt(rec, "ort build", lambda: build_bundle(ckpt, work / f"{name}.ort", "onnx", dev,
                                                                args.ort_precision))
    out_name = source.outputs[0].name
    runners: dict[str, Callable[[dict[str, Any]], Any]] = {}

    def eager_bf16() -> Any:
        from mixexport.pipeline import initial_bundle

        program = cast_bundle(initial_bundle(source), "bf16").segments[0].program
        if dev == "cuda":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cuda")
        return program.module()

    module = attempt(rec, "eager bf16", eager_bf16)
    if module is not None:
        runners["eager bf16"] = lambda feeds: module(**feeds)
        if not args.no_compile:
            compiled = torch.compile(module)
            runners["torch.compile bf16"] = lambda feeds: compiled(**feeds)
    from mixexport.bundle import read_manifest

    for key, label in (("aoti", f"aoti {args.aoti_precision}"), ("ort", f"onnxruntime {args.ort_precision}")):
        if not rec[key]:
            continue
        path = Path(rec[key]["path"])
        segs = read_manifest(path).segments
        if len(segs) != 1:  # split bundles run their segment DAG: through the runtime, numpy I/O included
            runner = attempt(rec, f"{key} runtime", lambda: runtime_runner(path, dev, source, out_name))
            label += " (runtime, numpy I/O)"
        elif key == "aoti":  # a full segment takes the flat rows directly, on device tensors
            pkg = torch._inductor.aoti_load_package(str(path / segs[0].engines["aoti"]))
            runner = lambda feeds, pkg=pkg: pkg(**feeds)  # noqa: E731
        else:
            runner = attempt(rec, "ort session", lambda: ort_runner(path / segs[0].file, dev, out_name))
        if runner is not None:
            runners[label] = runner
    rec["latency"] = {}
    reference = model.to(dev)
    for b in args.batches:
        feeds = {k: torch.from_numpy(v).to(dev) for k, v in source.example_feeds(b, seed=b).items()}
        with torch.inference_mode():
            want = reference(**feeds).float().cpu().numpy()
        row: dict[str, Any] = {}
        for label, fn in runners.items():
            def one(fn: Callable[[dict[str, Any]], Any] = fn, label: str = label) -> dict[str, Any]:
                with torch.inference_mode():
                    got = fn(feeds)
                    got = got.float().cpu().numpy() if hasattr(got, "cpu") else np.asarray(got, dtype=np.float32)
                    ms = timed(lambda: fn(feeds), dev, args.budget)
                err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
                mfu = (rec["flops_per_row"] * b / (ms / 1e3) / (args.peak_tflops * 1e12)
                       if rec["flops_per_row"] and args.peak_tflops else None)
                return {"p50_ms": ms, "max_rel_vs_fp32": err, "mfu": mfu}
            row[label] = attempt(rec, f"latency {label} B={b}", one)
        rec["latency"][str(b)] = row
    rec["trt_rtx"] = attempt(rec, "trt-rtx", lambda: trt_rtx_builds(rec))
    return rec


def trt_rtx_builds(rec: dict[str, Any]) -> dict[str, Any]:
    """Build every ONNX segment of the built bundles with TensorRT-RTX (nothing is run: it refuses
    compute capability 9.0; its builds need no GPU at all, so CI checks them too)."""
    from mixexport.backends.tensorrt import TensorRTRtxBackend
    from mixexport.bundle import read_manifest

    backend = TensorRTRtxBackend()
    reason = backend.build_unavailable_reason()
    if reason:
        return {"skipped": reason}
    out: dict[str, Any] = {"version": str(backend.module(build=True).__version__)}
    for key in ("ort", "aoti"):  # fp16 and bf16 ONNX graphs (the AOTI bundle keeps its ONNX too)
        if not rec.get(key):
            continue
        with tempfile.TemporaryDirectory(prefix="gpu-check-rtx-") as tmp:
            reports = TensorRTRtxBackend().compile_bundle(read_manifest(rec[key]["path"]), Path(tmp))
        for seg, r in reports.items():
            out[f"{rec[key]['precision']}/{seg}"] = {"parsed": True, "built": True, "plan_bytes": r["bytes"],
                                                     "build_s": r["seconds"]}
    return out


def machine(device: str) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs instead of base (quick CPU check)")
    p.add_argument("--batches", default="64,512,2048", help="B values (flat rows), comma-separated")
    p.add_argument("--families", default="", help="comma-separated subset of FAMILIES (default: all)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per runner and B")
    p.add_argument("--aoti-precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--ort-precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"MFU denominator (default {H100_BF16_TFLOPS:g} on cuda, none on cpu)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = H100_BF16_TFLOPS
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU (use --device cpu for a dry run)", file=sys.stderr)
        return 3
    from mixexport.models import FAMILIES

    chosen = [f for f in args.families.split(",") if f] or list(FAMILIES)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.out))
    report: dict[str, Any] = {"machine": machine(args.device), "batches": args.batches,
                              "peak_tflops": args.peak_tflops, "families": {}}
    for name in chosen:
        print(f"== {name}", file=sys.stderr)
        report["families"][name] = check_family(name, FAMILIES[name], args, work)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    ok = all(not f.get("errors") and all((f.get(k) or {}).get("parity") == "PASS" for k in ("aoti", "ort"))
             for f in report["families"].values())
    for name, f in report["families"].items():
        for b, row in f["latency"].items():
            cells = ", ".join(f"{k} {v['p50_ms']:.3g} ms" + (f" (MFU {v['mfu']:.1%})" if v and v["mfu"] else "")
                              for k, v in row.items() if v)
            print(f"{name} B={b}: {cells}")
    print(f"wrote {path}: {'OK' if ok else 'FAILURES (see errors/parity in the JSON)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

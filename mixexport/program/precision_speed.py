"""Is a reduced precision actually faster than fp32 on this CPU?

Not always: int8 GEMMs pay a quantize/dequantize per activation, and on small GEMMs (DIN's
attention MLP: a few hundred FLOPs per row) that costs more than the multiply saves — measured
2.1× slower than fp32 on DIN. A user asking for ``--precision int8`` should hear so. Two places say it:

- ``inspect`` measures (:func:`measure_precisions`): the model's float32 ONNX and its W8A16 and int8
  forms (the same passes a build adds), each in ONNX Runtime on this CPU, 1 user × :data:`CANDIDATES`,
  timed interleaved for a short budget. fp16/bf16 are not measured there (each needs its own
  re-export; ONNX Runtime's CPU provider has no bf16 kernels at all).
- ``bench`` on a reduced-precision ONNX Runtime bundle also times the model's plain fp32 ONNX
  (the ``ort-default`` peer) in the same run, and :func:`slower_than_fp32` compares p50 per N.

A precision is reported slower when its p50 exceeds fp32's by more than :data:`MARGIN` (timing noise
on a shared CPU is a few percent).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from mixexport.source import Source

CANDIDATES = 64      # 1 user × 64: small enough to stay quick, large enough for GEMMs to matter
BUDGET_S = 0.3       # timing budget per precision in inspect
MARGIN = 1.10        # slower means > 10 % above fp32's p50
#: precisions a bundle may have that are "reduced" (fp32 is the reference)
REDUCED = ("fp16", "bf16", "w8a16", "int8")
#: the fp32 runner bench adds for a reduced-precision bundle (stock ORT on the plain fp32 ONNX)
FP32_PEER = "ort-default"


def measure_precisions(source: Source, candidates: int = CANDIDATES, budget_s: float = BUDGET_S,
                       say: Callable[[str], None] = lambda _m: None, onnx: Any = None) -> dict[str, Any]:
    """p50 (ms) of fp32, w8a16 and int8 on ONNX Runtime CPU for 1 user × ``candidates``, and a
    warning per precision slower than fp32. A precision whose pass does not apply is left out, with
    its reason. ``onnx``: the model's ONNX-stage bundle when the caller has one (inspect's pass
    checks built it), else it is exported here."""
    from mixexport.errors import MixexportError
    from mixexport.passes.options import build_options
    from mixexport.passes.order import pass_by_name
    from mixexport.pipeline import run_pass
    from mixexport.stages import initial_bundle, stage_runtime, to_onnx_stage
    from mixexport.verification.latency import time_interleaved

    say(f"timing fp32, w8a16 and int8 on ONNX Runtime CPU (1 user x {candidates})")
    request = source.example_request(1, candidates, seed=11)
    fp32 = onnx if onnx is not None else to_onnx_stage(initial_bundle(source), source.example_request(2, 16, seed=0))
    bundles, skipped = {"fp32": fp32}, {}
    for precision, name in (("w8a16", "quantize-w8a16"), ("int8", "quantize-int8")):
        info = pass_by_name(name)
        try:
            bundles[precision] = run_pass(info, fp32, build_options(name, {}), []).bundle
        except MixexportError as e:
            skipped[precision] = e.message
    runtimes = {p: stage_runtime(b) for p, b in bundles.items()}
    try:
        stats = time_interleaved({p: (lambda rt=rt: rt.score(request, validate=False)) for p, rt in runtimes.items()},
                                 budget_s=budget_s)
    finally:
        for rt in runtimes.values():
            rt.close()
    p50 = {p: round(s.p50_ms, 4) for p, s in stats.items()}
    return {"candidates": candidates, "backend": "onnxruntime (CPU)", "p50_ms": p50, "skipped": skipped,
            "warnings": [_warning(p, p50[p], p50["fp32"], f"1 user x {candidates}")
                         for p in p50 if p != "fp32" and p50[p] > MARGIN * p50["fp32"]]}


def slower_than_fp32(report: Mapping[str, Any], precision: str) -> list[str]:
    """Warnings for ``bench``: the bundle's p50 against the fp32 peer's, at every N where it is slower."""
    runners = report.get("runners", {})
    bundle = next((k for k in runners if k.startswith("bundle")), None)
    if precision not in REDUCED or bundle is None or FP32_PEER not in runners:
        return []
    out = []
    for n in report.get("candidates", []):
        mine, fp32 = runners[bundle].get(str(n)), runners[FP32_PEER].get(str(n))
        if mine and fp32 and mine["p50_ms"] > MARGIN * fp32["p50_ms"]:
            out.append(_warning(precision, mine["p50_ms"], fp32["p50_ms"], f"{report.get('users', 1)} user x {n}"))
    return out


def _warning(precision: str, ms: float, fp32_ms: float, where: str) -> str:
    return (f"--precision {precision} is {ms / fp32_ms:.2f}x slower than fp32 on this CPU at {where} "
            f"(p50 {ms:.3g} ms vs {fp32_ms:.3g} ms): its GEMMs are too small for the saving to pay for "
            "the conversions; build --precision fp32 unless the bundle's size matters more")


def with_fp32_peer(bundle: Any, peers: tuple[str, ...], backend: str | None, device: str) -> tuple[tuple[str, ...], str]:
    """``bench``'s peers plus the fp32 runner when ``bundle`` (a directory) is a reduced-precision
    ONNX Runtime bundle timed on CPU, and the bundle's precision. Other backends are left alone: an
    fp32 ONNX Runtime run is not their fp32."""
    from mixexport.bundle import read_manifest

    manifest = read_manifest(bundle)
    precision = str(manifest.data.get("precision") or "fp32")
    on_ort = (backend or manifest.segments[0].backend) == "onnxruntime"
    if precision in REDUCED and on_ort and device == "cpu" and FP32_PEER not in peers:
        peers = (*peers, FP32_PEER)
    return peers, precision

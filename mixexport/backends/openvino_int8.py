"""int8 on ``--target openvino``: NNCF post-training quantization of each segment's OpenVINO model,
calibrated on the bundle's own requests.

Why NNCF's form and not ours. ``quantize-int8`` (the ONNX Runtime int8 form) quantizes activations
per row at run time (``ReduceMax`` → blocked ``QuantizeLinear`` → ``com.microsoft``
``MatMulIntegerToFloat``). OpenVINO cannot read the ``com.microsoft`` op, and its CPU plugin runs
integer GEMMs only for *statically* scaled ``FakeQuantize`` (what a standard QDQ pair with constant
scales becomes): a run-time scale leaves the GEMM in float. OpenVINO's own run-time activation
quantization (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` on ``nncf.compress_weights`` models) applies to
2-D ``FullyConnected`` weights only, not to the per-token ``[T,K,N]`` batched GEMMs that dominate a
mixer (measured on rankmixer base, docs/openvino.md: no faster than f32). So the form that runs
int8 GEMMs on OpenVINO is static QDQ with calibrated activation ranges — which is what NNCF emits,
with its per-channel 8-bit weights and its overflow fix for CPUs without VNNI.

What is quantized: the GEMMs after the first normalization, nothing else (:func:`quantize_model`),
less the routers and the tiny GEMMs (:func:`small_gemms`).
NNCF's default also puts per-tensor quantizers on residual Adds, LayerNorm inputs and the sequence
pooling's sum and count, and on the input projections, whose input concatenates raw heterogeneous
features (one per-tensor scale over them costs the small ones their resolution). On the trained
MovieLens rankmixer that took mean Kendall tau to 0.976 (< 0.98) and the logits' max abs error to
0.23; GEMMs only with the input projections float: tau 0.993, max abs error 0.019, 6 of 8 GEMMs
int8 and no slower (the input projections are the smallest GEMMs; docs/openvino.md).

Calibration data: the feeds every segment sees (user state of a split bundle included) for the
build's sample request and a few generated requests (:data:`CALIBRATION_REQUESTS`), plus, for a
model trained on MovieLens-100k, :data:`TRAIN_REQUESTS` requests of its *train* split (generated
ids are uniform, real ones are not: ranges from generated data alone cost a trained rankmixer
Kendall tau 0.978 < 0.98), recorded by running the float segments. The test split, which verify's
metric gates use, is never seen. The verify step then gates the result like every int8 bundle (int8
tensor tolerances, |ΔAUC| and Kendall tau on labelled data).

8-bit GEMMs are exact only with an int8 dot-product instruction (VNNI: no int16 saturation of
u8·s8 pair sums), so an int8 segment records ``requires_cpu`` (:data:`VNNI_REQUIREMENT`) and a
serving CPU without VNNI is refused before loading.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import sys
from typing import Any, Callable, Iterator

import numpy as np

from mixexport.bundle import Bundle

#: Any one of these flags has an int8 dot product (``/proc/cpuinfo`` spelling).
VNNI_REQUIREMENT = "avx512_vnni|avx_vnni|amx_int8"
#: (users, candidates, seed) of the requests whose segment feeds calibrate the activation ranges;
#: the first is the build's sample request (inputs/sample.npz).
CALIBRATION_REQUESTS = ((2, 16, 0), *((1, 64, seed) for seed in range(1, 8)))
#: Requests of the train split added for models trained on a known dataset: TRAIN_REQUESTS of
#: TRAIN_ROWS rows each (one user per row).
TRAIN_REQUESTS, TRAIN_ROWS = 8, 32
#: OpenVINO op types quantized (weights int8 per channel, activations with a calibrated static scale).
GEMMS = frozenset({"MatMul", "Convolution", "GroupConvolution"})
#: GEMMs with an input or output dimension this small stay float (:func:`small_gemms`).
SMALL_GEMM = 16
#: Op types that normalize their input (LayerNorm reads as MVN; RMSNorm's x / sqrt(mean(x²) + eps)
#: as a Sqrt): a GEMM after one of them sees bounded, homogeneous activations.
NORMALIZATIONS = frozenset({"MVN", "NormalizeL2", "RMS", "Sqrt"})


def calibration_requests(bundle: Bundle) -> list[Any]:
    """The generated requests of :data:`CALIBRATION_REQUESTS`, and train-split requests where the
    model's dataset is known and available here."""
    source = bundle.source
    requests = [source.example_request(u, n, seed=seed) for u, n, seed in CALIBRATION_REQUESTS]
    from mixexport.data import MOVIELENS, movielens_100k, movielens_available
    from mixexport.specs import request_from_rows

    if source.dataset == MOVIELENS and movielens_available() is None:
        schema = source.module.config.schema  # type: ignore[union-attr]
        train = movielens_100k(seq_len=schema.seq_len, behaviour_len=schema.behaviour_len).train
        # rows spread over the split; each row its own user (a train user's history differs per row)
        rows = np.linspace(0, len(train) - 1, TRAIN_REQUESTS * TRAIN_ROWS, dtype=np.int64).reshape(TRAIN_REQUESTS, -1)
        requests += [request_from_rows(train.feeds, source.inputs, [(int(i), np.array([i])) for i in chunk])
                     for chunk in rows]
    return requests


def calibration_feeds(bundle: Bundle, stage_runtime: Callable[..., Any]) -> dict[str, list[dict[str, np.ndarray]]]:
    """{segment name: the feeds it saw} for every request of :func:`calibration_requests`, from the
    float segments run by ``stage_runtime(bundle, trace=…)`` (the build's in-memory runtime,
    :func:`mixexport.pipeline.stage_runtime`; passed in, since the pipeline imports the backends)."""
    out: dict[str, list[dict[str, np.ndarray]]] = {seg.name: [] for seg in bundle.segments}
    trace: dict[str, dict[str, np.ndarray]] = {}
    with stage_runtime(bundle, trace=trace) as rt:
        for request in calibration_requests(bundle):
            trace.clear()
            rt.score(request, validate=False)
            for name, feeds in trace.items():
                out[name].append({k: np.array(v) for k, v in feeds.items()})
    return out


def float_gemms(model: Any) -> list[str]:
    """The GEMMs of ``model`` that stay in float: those whose activation inputs see no normalization
    (:data:`NORMALIZATIONS`) between the model's inputs and them — the input projections (a
    family's tokenizer / dense-feature projections), in graph order."""
    normalized: dict[str, bool] = {}
    out = []
    for op in model.get_ordered_ops():
        sources = [i.get_source_output().get_node() for i in op.inputs()]
        normalized[op.get_friendly_name()] = (op.get_type_name() in NORMALIZATIONS
                                              or any(normalized.get(n.get_friendly_name(), False) for n in sources))
        activations = [n for n in sources if n.get_type_name() != "Constant"]
        if op.get_type_name() in GEMMS and not any(normalized[n.get_friendly_name()] for n in activations):
            out.append(op.get_friendly_name())
    return out


def small_gemms(model: Any, patterns: tuple[str, ...]) -> list[str]:
    """The GEMMs whose constant weight is named like ``patterns`` (``quantize-int8``'s ``skip``:
    routers), or has an input or output dimension of at most :data:`SMALL_GEMM`: a router's few
    experts, a gate-weighted expert bias, the head's one logit. They cost next to nothing, and
    one 8-bit activation scale over them moves every output they give (a router's error flips
    experts: on the tiny MovieLens rankmixer-moe, quantizing them took mean Kendall tau from
    0.982 to 0.970, and from 0.979 to 0.968 on tokenmixer-large)."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in GEMMS:
            continue
        weight = op.input_value(1).get_node()
        shape = op.get_input_partial_shape(1)
        small = shape.is_static and len(shape) >= 2 and min(shape.to_shape()[-2:]) <= SMALL_GEMM
        named = weight.get_type_name() == "Constant" and any(fnmatch.fnmatch(weight.get_friendly_name(), p)
                                                              for p in patterns)
        if small or named:
            out.append(op.get_friendly_name())
    return out


def quantize_model(model: Any, feeds: list[dict[str, np.ndarray]]) -> tuple[Any, dict[str, Any]]:
    """NNCF's int8 post-training quantization of the OpenVINO ``model`` on ``feeds``, restricted to
    the GEMMs after the first normalization (:func:`float_gemms` stay float, and no op other than a
    GEMM gets a quantizer); returns the quantized model and a report (what was kept in float, int8
    constants found, calibration size)."""
    import nncf

    from mixexport.passes.options import QuantizeInt8Options

    gemms = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() in GEMMS]
    kept = float_gemms(model)
    kept += [n for n in small_gemms(model, QuantizeInt8Options().skip) if n not in kept]
    # every other op type is ignored: a quantizer on a residual Add, a LayerNorm input or a pooling
    # sum saves no GEMM and, with one per-tensor scale, costs the rows whose values are small
    others = sorted({op.get_type_name() for op in model.get_ops()} - GEMMS - {"Parameter", "Result", "Constant"})
    report = {"method": "nncf.quantize", "nncf": nncf.__version__, "calibration_requests": len(feeds),
              "gemms": len(gemms), "float_gemms": kept,
              "float_rule": "input projections (GEMMs with no normalization between the model inputs and "
                            f"them), routers and GEMMs with a dimension <= {SMALL_GEMM}, and every op other than "
                            "a GEMM"}
    if len(kept) == len(gemms):  # e.g. a user segment of input projections only: nothing to quantize
        return model, {**report, "int8_constants": 0, "skipped": "no GEMM after a normalization"}
    scope = nncf.IgnoredScope(names=kept, types=others, validate=False)
    with quiet_nncf(nncf):
        quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), ignored_scope=scope)
    int8 = sum(1 for op in quantized.get_ops()
               if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8"))
    return quantized, {**report, "int8_constants": int8}


@contextlib.contextmanager
def quiet_nncf(nncf: Any) -> Iterator[None]:
    """NNCF logs INFO lines and draws progress bars on *stdout*, which is where ``--json`` output
    goes: during a quantization its log says warnings only (everything with ``-v``), and anything it
    prints goes to stderr."""
    verbose = logging.getLogger("mixexport").isEnabledFor(logging.INFO)
    level = nncf.nncf_logger.level
    nncf.set_log_level(logging.INFO if verbose else logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        nncf.set_log_level(level)


def int8_check(report: dict[str, Any], engine_bytes: int, float_bytes: int) -> dict[str, Any]:
    """The record ``verify`` reads (segment ``engine_build.int8``): PASS when the quantized IR holds
    int8 weight constants, SKIPPED when the segment had no GEMM to quantize (:func:`quantize_model`),
    FAIL when NNCF left none; the byte ratio against the float IR says how much of it is int8."""
    status = "PASS" if report["int8_constants"] else "SKIPPED" if report.get("skipped") else "FAIL"
    return {"status": status, "engine_bytes": engine_bytes,
            "float_engine_bytes": float_bytes, "ratio": round(engine_bytes / max(float_bytes, 1), 3)}

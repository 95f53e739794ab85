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

from typing import Any, Callable

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


def quantize_model(model: Any, feeds: list[dict[str, np.ndarray]]) -> tuple[Any, dict[str, Any]]:
    """NNCF's int8 post-training quantization of the OpenVINO ``model`` on ``feeds``; returns the
    quantized model and a report (int8 constants found, calibration size)."""
    import nncf

    quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))
    int8 = sum(1 for op in quantized.get_ops()
               if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8"))
    return quantized, {"method": "nncf.quantize", "nncf": nncf.__version__, "calibration_requests": len(feeds),
                       "int8_constants": int8}


def int8_check(report: dict[str, Any], engine_bytes: int, float_bytes: int) -> dict[str, Any]:
    """The record ``verify`` reads (segment ``engine_build.int8``): PASS when the quantized IR holds
    int8 weight constants; the byte ratio against the float IR says how much of it is int8."""
    return {"status": "PASS" if report["int8_constants"] else "FAIL", "engine_bytes": engine_bytes,
            "float_engine_bytes": float_bytes, "ratio": round(engine_bytes / max(float_bytes, 1), 3)}

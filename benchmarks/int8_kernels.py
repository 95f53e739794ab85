#!/usr/bin/env python
"""ONNX Runtime CPU int8 GEMM forms for one per-token GEMM of rankmixer base: speed and error.

    python benchmarks/int8_kernels.py [--rounds 15] [--tokens 16 --rows 256 --k 320 --n 1280]   # writes
                                                                    # benchmarks/results/int8_kernels.json

x ``[T, M, K]`` (with a few outlier columns, as real activations have) @ W ``[T, K, N]``, the shape of
rankmixer base's fc1 at 256 candidates, in every form ``quantize-int8`` could take: fp32 ``MatMul``;
per-tensor ``DynamicQuantizeLinear`` + ``MatMulInteger``/``MatMulIntegerToFloat``/
``DynamicQuantizeMatMul``; per-row activation scales with u8×s8 (7-bit or 8-bit weights), u8×u8 and
s8×s8; fused or not; the row quantization as Div/Round/Add/Cast or one blocked ``QuantizeLinear``.
Weights are per-(token, channel) int8. Prints, per form, the median and fastest time of
``--rounds`` runs (forms interleaved round by round) and the max and Frobenius relative error against
float64. On AVX2 without VNNI, 8-bit s8 weights against u8 activations saturate (int16 pair sums).
"""

from __future__ import annotations

import argparse

import numpy as np
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import results


def main() -> None:
    started = results.start()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--k", type=int, default=320)
    ap.add_argument("--n", type=int, default=1280)
    results.add_save_options(ap, "int8_kernels")
    a = ap.parse_args()
    import onnxruntime as ort

    t, m, k, n = a.tokens, a.rows, a.k, a.n
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((t, k, n)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((t, m, k)).astype(np.float32)
    x[:, :, :3] *= 8  # outlier columns
    ref = x.astype(np.float64) @ w.astype(np.float64)

    def c(name: str, v: object) -> object:
        return nh.from_array(np.asarray(v), name)

    def model(nodes: list, inits: list) -> bytes:
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["T", "M", k])],
                         [h.make_tensor_value_info("y", TP.FLOAT, None)], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)],
                            ir_version=10).SerializeToString()

    def wq(qmax: int, unsigned: bool = False) -> list:
        ws = np.abs(w).max(axis=1, keepdims=True) / qmax
        q = np.clip(np.rint(w / ws), -qmax, qmax)
        arr = (q + 128).astype(np.uint8) if unsigned else q.astype(np.int8)
        return [c("Wq", arr), c("ws", ws.astype(np.float32))] + ([c("wzp", np.uint8(128))] if unsigned else [])

    def per_tensor(fused: str, qmax: int = 127) -> bytes:
        if fused == "dqmm":
            return model([h.make_node("DynamicQuantizeMatMul", ["x", "Wq", "ws"], ["y"], domain="com.microsoft")], wq(qmax))
        dql = h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"])
        if fused == "mmitf":
            return model([dql, h.make_node("MatMulIntegerToFloat", ["xq", "Wq", "xs", "ws", "xz"], ["y"],
                                           domain="com.microsoft")], wq(qmax))
        return model([dql, h.make_node("MatMulInteger", ["xq", "Wq", "xz"], ["acc"]),
                      h.make_node("Cast", ["acc"], ["accf"], to=TP.FLOAT), h.make_node("Mul", ["xs", "ws"], ["s"]),
                      h.make_node("Mul", ["accf", "s"], ["y"])], wq(qmax))

    def per_row(qmax: int, act: str = "u8", fused: bool = True, quantize: str = "qlinear") -> bytes:
        nodes = [h.make_node("Abs", ["x"], ["ax"]), h.make_node("ReduceMax", ["ax", "axes"], ["m"], keepdims=1),
                 h.make_node("Mul", ["m", "inv"], ["rs0"]), h.make_node("Max", ["rs0", "tiny"], ["rs"])]
        inits = [c("axes", np.array([-1], np.int64)), c("inv", np.float32(1 / 127)), c("tiny", np.float32(1e-30)),
                 c("one", np.float32(1)), c("zp", np.uint8(128)), c("zf", np.float32(128))]
        inits += wq(qmax, unsigned=act == "u8u8")
        if act == "s8":
            nodes += [h.make_node("Div", ["x", "rs"], ["xd"]), h.make_node("Round", ["xd"], ["xr"]),
                      h.make_node("Cast", ["xr"], ["xq"], to=TP.INT8)]
            zps: list[str] = []
        elif quantize == "qlinear":
            nodes += [h.make_node("Shape", ["rs"], ["sh"]), h.make_node("Expand", ["zp", "sh"], ["zpe"]),
                      h.make_node("QuantizeLinear", ["x", "rs", "zpe"], ["xq"], axis=-1, block_size=k)]
            zps = ["zp"]
        else:
            nodes += [h.make_node("Div", ["x", "rs"], ["xd"]), h.make_node("Round", ["xd"], ["xr"]),
                      h.make_node("Add", ["xr", "zf"], ["xa"]), h.make_node("Cast", ["xa"], ["xq"], to=TP.UINT8)]
            zps = ["zp"]
        bz = ["wzp"] if act == "u8u8" else []
        if fused:
            ins = ["xq", "Wq", "one", "ws"] + (zps or ([""] if bz else [])) + bz
            nodes += [h.make_node("MatMulIntegerToFloat", ins, ["y0"], domain="com.microsoft")]
        else:
            ins = ["xq", "Wq"] + (zps or ([""] if bz else [])) + bz
            nodes += [h.make_node("MatMulInteger", ins, ["acc"]), h.make_node("Cast", ["acc"], ["accf"], to=TP.FLOAT),
                      h.make_node("Mul", ["accf", "ws"], ["y0"])]
        nodes.append(h.make_node("Mul", ["y0", "rs"], ["y"]))
        return model(nodes, inits)

    w32 = [c("W", w)]
    forms = {
        "fp32 MatMul": model([h.make_node("MatMul", ["x", "W"], ["y"])], w32),
        "per-tensor DQL + MatMulInteger, w8": per_tensor("mmi"),
        "per-tensor DQL + MatMulIntegerToFloat, w8": per_tensor("mmitf"),
        "per-tensor DQL + MatMulIntegerToFloat, w7": per_tensor("mmitf", 63),
        "per-tensor DynamicQuantizeMatMul, w8": per_tensor("dqmm"),
        "per-row u8 x s8 w8, QuantizeLinear, fused": per_row(127),
        "per-row u8 x s8 w7, QuantizeLinear, fused": per_row(63),
        "per-row u8 x s8 w7, Div/Round/Cast, fused": per_row(63, quantize="ops"),
        "per-row u8 x s8 w7, QuantizeLinear, MatMulInteger": per_row(63, fused=False),
        "per-row u8 x u8 w8, QuantizeLinear, fused": per_row(127, act="u8u8"),
        "per-row s8 x s8 w8, MatMulInteger": per_row(127, act="s8", fused=False),
    }
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("optimization.disable_specified_optimizers", "QDQSelectorActionTransformer")
    sessions, errors, not_runnable = {}, {}, {}
    for name, proto in forms.items():
        try:
            s = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
            y = s.run(None, {"x": x})[0]
        except Exception as e:  # noqa: BLE001 - report the form as not runnable
            not_runnable[name] = str(e).splitlines()[0][:120]
            print(f"{name:52} does not run: {not_runnable[name]}")
            continue
        sessions[name] = s
        errors[name] = (np.abs(y - ref).max() / np.abs(ref).max(), np.linalg.norm(y - ref) / np.linalg.norm(ref))
    stats = results.time_rounds({name: lambda s=s: s.run(None, {"x": x}) for name, s in sessions.items()}, a.rounds)
    base = stats["fp32 MatMul"].p50_ms
    print(f"x [{t},{m},{k}] @ W [{t},{k},{n}], {a.rounds} interleaved rounds, onnxruntime {ort.__version__}")
    print(f"{'form':52} {'median ms':>9} {'min ms':>7} {'vs fp32':>7} {'max_rel':>8} {'fro_rel':>8}")
    rows = []
    for name, st in stats.items():
        print(f"{name:52} {st.p50_ms:9.1f} {st.min_ms:7.1f} {base / st.p50_ms:6.2f}x "
              f"{errors[name][0]:8.2e} {errors[name][1]:8.2e}")
        rows.append({"form": name, "p50_ms": round(st.p50_ms, 3), "min_ms": round(st.min_ms, 3),
                     "x_vs_fp32": round(base / st.p50_ms, 3), "max_rel_err": float(errors[name][0]),
                     "fro_rel_err": float(errors[name][1])})
    results.save(a, "int8_kernels", started,
                 f"One per-token GEMM of rankmixer base's shape, x [{t},{m},{k}] @ W [{t},{k},{n}], in every int8 "
                 f"form quantize-int8 could take on ONNX Runtime {ort.__version__} CPU: median and fastest of "
                 f"{a.rounds} interleaved rounds, speed-up over fp32 and error against float64 "
                 "(x_vs_fp32 > 1 is faster).",
                 {"forms": rows, **({"not_runnable": not_runnable} if not_runnable else {})})


if __name__ == "__main__":
    results.run(main)

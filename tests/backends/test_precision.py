"""``--precision fp16|bf16``: the cast at export (pure, interface unchanged), fp16 ONNX bundles on ONNX
Runtime CPU with the fp16 tolerances, bf16 refused by ORT CPU with exit 3, bf16 through AOTI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mixexport.bundle import read_manifest
from mixexport.errors import BadInputError
from mixexport.pipeline import BuildOptions, build, initial_bundle
from mixexport.precision import cast_bundle, torch_dtype
from mixexport.source import load_source
from mixexport.verification.compare import DEFAULT_TOLERANCES
from tests.cli_helpers import MIXEXPORT

from .conftest import aoti_bundle_for



@pytest.fixture(scope="module")
def program_bundle(tiny_ckpt: Path):  # noqa: ANN201 - a program-stage Bundle
    return initial_bundle(load_source(tiny_ckpt))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cast_is_pure_and_keeps_the_interface(program_bundle, tiny_ckpt: Path, precision: str) -> None:  # noqa: ANN001
    before = {k: v.clone() for k, v in program_bundle.segments[0].program.state_dict.items()}
    cast = cast_bundle(program_bundle, precision)
    assert cast.precision == precision and program_bundle.precision == "fp32"
    after = program_bundle.segments[0].program.state_dict
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in after.items())  # untouched
    program = cast.segments[0].program
    assert {v.dtype for v in program.state_dict.values()} == {torch_dtype(precision)}
    source = load_source(tiny_ckpt)
    feeds = source.example_feeds(37, seed=3)
    out = program.module()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert out.dtype == torch.float32 and out.shape == (37, 1)  # inputs/outputs stay float32
    diff = np.abs(out.detach().numpy() - source.reference(feeds)["logit"])
    rtol, atol = DEFAULT_TOLERANCES[precision]
    assert 0 < diff.max() <= atol + rtol * np.abs(source.reference(feeds)["logit"]).max()  # cast, but close


def test_fp32_is_a_no_op_and_unknown_is_refused(program_bundle) -> None:  # noqa: ANN001
    assert cast_bundle(program_bundle, "fp32") is program_bundle
    with pytest.raises(BadInputError, match="unknown --precision 'int4'"):
        cast_bundle(program_bundle, "int4")


def test_fp16_onnx_bundle_runs_on_ort_cpu(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    result = build(tiny_ckpt, BuildOptions(out=out, precision="fp16", bench=False))
    m = read_manifest(out)
    assert m.data["precision"] == "fp16" and result.parity["status"] == "PASS"
    rtol, atol = DEFAULT_TOLERANCES["fp16"]
    assert result.parity["tolerances"]["logit"] == {"rtol": rtol, "atol": atol}  # verify used fp16 tolerances
    assert 1e-6 < result.parity["max_rel"] <= rtol  # really computed in fp16, within the fp16 gate
    model = onnx.load(str(out / m.segments[0].file))
    floats = {t.data_type for t in model.graph.initializer if t.data_type in (1, 10, 16)}
    assert floats == {onnx.TensorProto.FLOAT16}
    elem = {i.name: i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.output)}
    assert elem["item_dense"] == elem["logit"] == onnx.TensorProto.FLOAT  # the interface is float32


def test_bf16_onnx_on_cpu_exits_3(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    r = subprocess.run([MIXEXPORT, "build", str(tiny_ckpt), "--precision", "bf16", "--out", str(out),
                        "--no-bench"], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "ONNX Runtime (CPUExecutionProvider) has no kernel" in r.stderr and "bfloat16" in r.stderr
    assert not out.exists()


def test_bf16_aoti_bundle_on_cpu(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = aoti_bundle_for(tiny_ckpt, tmp_path_factory.mktemp("aoti-bf16"), precision="bf16")
    m = read_manifest(out)
    parity = m.data["parity"]
    assert m.data["precision"] == "bf16" and parity["status"] == "PASS"
    assert 1e-4 < parity["max_rel"] <= DEFAULT_TOLERANCES["bf16"][0]
    # the stage ledger measures the bf16 program in torch; ORT CPU cannot run the bf16 ONNX, and says so
    ledger = {row["stage"]: row for row in json.loads((out / "reports/parity.json").read_text())["ledger"]}
    assert ledger["torch.export"]["outputs"][0]["max_rel"] > 1e-4
    assert "has no kernel" in ledger["onnx export"]["skipped"] and ledger["onnx export"]["outputs"] == []


def test_bf16_topk_keeps_fp32_inputs_so_the_onnx_is_valid() -> None:
    """ONNX TopK (opset 21) has no bfloat16: the cast runs TopK on fp32 values and casts them back."""
    from mixexport.export import to_onnx
    from mixexport.precision import cast_program
    from mixexport.specs import TensorSpec

    class Route(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(6, 5)

        def forward(self, item_x: torch.Tensor) -> torch.Tensor:
            top, idx = self.proj(item_x).topk(2, dim=-1)
            return top * idx.to(top.dtype)

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(Route().eval(), (), kwargs={"item_x": torch.from_numpy(x)},
                                  dynamic_shapes={"item_x": {0: batch}}, strict=False)
    cast = cast_program(program, "bf16", {"item_x": x}, {"item_x": {0: batch}})
    topk = [n for n in cast.graph.nodes if n.target is torch.ops.aten.topk.default]
    assert len(topk) == 1 and topk[0].args[0].meta["val"].dtype == torch.float32
    spec_in = (TensorSpec("item_x", "float32", ("batch", 6), "item"),)
    spec_out = (TensorSpec("out", "float32", ("batch", 2), "output"),)
    model = to_onnx(cast, spec_in, spec_out, {"item_x": x})
    onnx.checker.check_model(model, full_check=True)  # a bf16 TopK would fail type checking here


def test_exported_outputs_get_their_spec_dtype() -> None:
    """A graph output the exporter left in float32 gets a Cast to its spec's dtype (fp16 state)."""
    from onnx import helper

    from mixexport.export import _cast_outputs_to_spec
    from mixexport.specs import TensorSpec

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["n", 4])
    y = helper.make_tensor_value_info("state", onnx.TensorProto.FLOAT, ["n"])
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=onnx.TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["x32", "axes"], ["state"], keepdims=0)]
    axes = helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [axes]),
                              opset_imports=[helper.make_opsetid("", 21)])
    _cast_outputs_to_spec(model, (TensorSpec("state", "float16", ("users",), "state"),))
    onnx.checker.check_model(model, full_check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"x": np.ones((3, 4), dtype=np.float16)})
    assert out.dtype == np.float16 and out.tolist() == [4.0, 4.0, 4.0]

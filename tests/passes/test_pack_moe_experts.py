"""pack-moe-experts: structural (ONNX after packing), numeric (eager vs packed program vs ONNX
Runtime, for both MoE families and both forms), precondition, report, and an end-to-end build that
passes verification (purity: test_purity.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mixexport.bundle import Bundle
from mixexport.errors import BadInputError, PreconditionError
from mixexport.export import op_histogram, to_onnx
from mixexport.models import FAMILIES, rankmixer_moe, tokenmixer_large
from mixexport.passes import pack_moe_experts as pme
from mixexport.pipeline import BuildOptions, build, initial_bundle, run_pass
from mixexport.source import Source, load_source
from tests.conftest import make_checkpoint

# down_init=1: with the paper's 0.01 down-projection init the experts would barely move the output,
# and a wrong packing could hide under the tolerance; 2 blocks (4 MoE sites) keep the exports quick
CONFIGS = {"rankmixer-moe": rankmixer_moe.tiny(),
           "tokenmixer-large": dataclasses.replace(tokenmixer_large.tiny(), down_init=1.0, layers=2)}
FORBIDDEN = {"NonZero", "Loop", "If", "Einsum", "Scan", "Compress"}


@dataclasses.dataclass
class Case:
    source: Source
    bundle: Bundle
    packed: Bundle
    report: dict
    _onnx: onnx.ModelProto | None = None

    @property
    def packed_onnx(self) -> onnx.ModelProto:
        if self._onnx is None:                               # exported once, shared by the tests
            self._onnx = _onnx(self.packed, self.source.example_feeds(5, seed=1))
        return self._onnx


def _prepare(tmp: Path, family: str, form: str = "hidden-slice") -> Case:
    ckpt = make_checkpoint(tmp / f"{family}.pt", family, CONFIGS[family], seed=0)
    source = load_source(ckpt)
    bundle = initial_bundle(source)
    result = run_pass(pme.PASS, bundle, pme.Options(form=form), [])
    return Case(source, bundle, result.bundle, result.report)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _prepare(tmp_path_factory.mktemp("pme"), request.param)


def _onnx(bundle: Bundle, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    seg = bundle.segments[0]
    return to_onnx(seg.program, seg.inputs, seg.outputs, feeds)


def _run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _program_out(bundle: Bundle, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = bundle.segments[0].program.module()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out.numpy()


def test_structure_after_packing(case: Case) -> None:
    feeds = case.source.example_feeds(5, seed=1)
    before, after = _onnx(case.bundle, feeds), case.packed_onnx
    ops_before, ops_after = op_histogram(before), op_histogram(after)
    assert not FORBIDDEN & set(ops_after)
    assert ops_after["MatMul"] < ops_before["MatMul"]
    # every site's stacked weights [T, I, E·h] / [T, E·h, O] are initializers read by a MatMul
    inits = {i.name: tuple(i.dims) for i in after.graph.initializer}
    read = {inits[n.input[1]] for n in after.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    sites = case.report["segments"][0]["sites"]
    for site in sites:
        assert tuple(site["weights"]["w_in"]) in read and tuple(site["weights"]["w_out"]) in read
    # ...and no single expert's weight [T, I, h] is left
    per_expert = {(t, i, h // s["experts"]) for s in sites for t, i, h in [s["weights"]["w_in"]]}
    assert not per_expert & read and per_expert & {tuple(i.dims) for i in before.graph.initializer}
    assert after.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_report_counts_sites_experts_and_routing(case: Case) -> None:
    seg = case.report["segments"][0]
    family = case.source.family
    if family == "rankmixer-moe":
        assert case.report["sites"] == 2 and case.report["experts"] == 8
        assert all(s["kind"] == "mlp" and s["shared"] == 0 and s["routing"].endswith("relu") for s in seg["sites"])
        assert seg["sites"][0]["weights"] == {"w_in": [8, 64, 1024], "b_in": [8, 1, 1024],
                                              "w_out": [8, 1024, 64], "b_out": [8, 4, 64]}
    else:                                                    # F1 and F2 of 2 blocks, shared + 3 routed
        assert case.report["sites"] == 4 and case.report["experts"] == 16
        assert all(s["kind"] == "swiglu" and s["shared"] == 1 and "topk" in s["routing"] for s in seg["sites"])
        assert {s["site"]: s["weights"]["w_in"] for s in seg["sites"]}["blocks.0.f1"] == [4, 128, 256]
    assert seg["matmul_after"] < seg["matmul_before"] and seg["ops_after"] < seg["ops_before"]


def test_numeric_eager_vs_packed_program_vs_onnx_runtime(case: Case) -> None:
    feeds = case.source.example_feeds(37, seed=11)          # not the export batch size
    want = case.source.reference(feeds)["logit"]
    assert _rel(_program_out(case.packed, feeds), want) <= 1e-4
    model = case.packed_onnx
    assert _rel(_run_onnx(model, feeds), want) <= 1e-4
    one = case.source.example_feeds(1, seed=12)              # dynamic batch down to 1
    assert _rel(_run_onnx(model, one), case.source.reference(one)["logit"]) <= 1e-4


def test_numeric_check_detects_a_wrong_packing(case: Case) -> None:
    # the same comparison on a deliberately broken packing (two experts' down weights swapped) fails
    gm = case.packed.segments[0].program.module()
    site = case.report["segments"][0]["sites"][0]
    packed = gm.get_submodule(f"{site['site']}.packed_experts")
    w = packed.w_out.detach().unflatten(1, (site["experts"], -1))   # a new tensor: the fixture stays intact
    swapped = w[:, [1, 0, *range(2, site["experts"])]].flatten(1, 2)
    packed.w_out = torch.nn.Parameter(swapped, requires_grad=False)
    feeds = case.source.example_feeds(37, seed=11)
    with torch.no_grad():
        got = gm(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    assert _rel(got, case.source.reference(feeds)["logit"]) > 1e-3


def test_stacked_form_is_exact_too(case: Case) -> None:
    result = pme.pack_moe_experts(case.bundle, pme.Options(form="stacked"))
    site = result.report["segments"][0]["sites"][0]
    t, i, eh = case.report["segments"][0]["sites"][0]["weights"]["w_in"]
    assert site["weights"]["w_in"] == [site["experts"], t, i, eh // site["experts"]]   # [E,T,I,h]
    program = result.bundle.segments[0].program
    assert not {str(n.target) for n in program.graph.nodes} & {"aten.einsum.default", "aten.nonzero.default"}
    feeds = case.source.example_feeds(23, seed=2)
    assert _rel(_program_out(result.bundle, feeds), case.source.reference(feeds)["logit"]) <= 1e-4


@pytest.mark.parametrize("family,config", [("rankmixer", None),
                                           ("tokenmixer-large", tokenmixer_large.tiny_dense())])
def test_precondition_refuses_dense_models(family: str, config: object, tmp_path: Path) -> None:
    source = load_source(make_checkpoint(tmp_path / "dense.pt", family, config))
    with pytest.raises(PreconditionError) as err:
        pme.requires(initial_bundle(source))
    msg = err.value.message
    assert msg.startswith("pack-moe-experts expected a Sparse-MoE: E >= 2 expert MLPs/SwiGLUs")
    assert "found none" in msg and "model: blocks.[0-" in msg   # names the module lists it rejected
    assert "blocks.[0-1]: the members do not all read one shared input (not parallel experts)" in msg \
        or "blocks.[0-3]: the members do not all read one shared input (not parallel experts)" in msg


def test_precondition_refuses_the_onnx_stage_and_bad_options(case: Case) -> None:
    with pytest.raises(PreconditionError, match="at the onnx stage"):
        pme.requires(case.bundle.replace(stage="onnx"))
    with pytest.raises(BadInputError, match="unknown form"):
        pme.pack_moe_experts(case.bundle, pme.Options(form="sparse"))
    with pytest.raises(PreconditionError, match="found none"):   # already packed: nothing left
        pme.requires(case.packed)


def test_end_to_end_build_passes_verification(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "moe.pt", "rankmixer-moe", seed=1)
    result = build(ckpt, BuildOptions(out=tmp_path / "bundle", passes=("pack-moe-experts",), bench=False))
    assert result.parity["status"] == "PASS"
    assert [p["name"] for p in result.manifest["passes"]] == ["pack-moe-experts"]
    assert result.manifest["passes"][0]["report"]["sites"] == 2
    ops = result.manifest["segments"][0]["ops"]
    assert not FORBIDDEN & set(ops)
    assert FAMILIES["rankmixer-moe"].DEFAULT_PASSES == ("pack-moe-experts",)

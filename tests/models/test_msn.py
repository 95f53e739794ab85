"""MSN: the product-key memory read equals an exhaustive top-k over all slots, its graph has static
TopK only, split-user-item says on which side the memory read runs for each query (and moves it there),
and quantize-w8a16 stores the value table as int8 with per-row scales that survive ONNX Runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from mixexport.backends.onnxruntime import DEFAULT_OPTIONS
from mixexport.bundle import Bundle, Segment
from mixexport.errors import PreconditionError
from mixexport.models import FAMILIES, msn
from mixexport.passes import split_user_item as sp
from mixexport.passes.order import pass_by_name
from mixexport.passes.quantize_w8a16 import Options as QuantOptions
from mixexport.passes.quantize_w8a16 import quantize_w8a16
from mixexport.pipeline import initial_bundle, run_pass, to_onnx_stage
from mixexport.source import load_source
from mixexport.specs import TensorSpec
from mixexport.verification.int8 import survival_report
from tests import w8a16_models as wm
from tests.conftest import make_checkpoint


def test_registered_and_config_checks() -> None:
    assert FAMILIES["msn"] is msn and msn.tiny().slots == 1024
    assert msn.large().slots * msn.large().value_dim * 4 >= 2 * 2**30   # the > 2 GB benchmark table
    for bad, match in [({"top_k": 33}, "top_k"), ({"query_dim": 31}, "even"), ({"query_dim": 2}, ">= 4"),
                       ({"query": "item"}, "query"), ({"memory_after": 3}, "memory_after"), ({"dim": 60}, "divisible")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(msn.tiny(), **bad)


def exhaustive_read(mem: msn.ProductKeyMemory, q: torch.Tensor) -> torch.Tensor:
    """The memory read without product keys: score all n² slots, top-k, softmax, weighted values."""
    b = q.shape[0]
    q = F.normalize(q.reshape(b, mem.heads, 2, mem.half), dim=-1)
    s1 = torch.einsum("bhd,hnd->bhn", q[:, :, 0], F.normalize(mem.keys1, dim=-1)) * mem.temperature
    s2 = torch.einsum("bhd,hnd->bhn", q[:, :, 1], F.normalize(mem.keys2, dim=-1)) * mem.temperature
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).reshape(b, mem.heads, mem.n * mem.n)  # slot i·n + j
    top, slot = torch.topk(full, mem.k, dim=-1)
    rows = mem.values.weight[slot]                                             # [B,h,k,dv]
    return (rows * torch.softmax(top, -1).unsqueeze(-1)).sum((1, 2))


def test_product_keys_equal_the_exhaustive_top_k() -> None:
    torch.manual_seed(0)
    mem = msn.ProductKeyMemory(dataclasses.replace(msn.tiny(), sub_keys=16, top_k=5, memory_heads=3)).eval()
    q = torch.randn(64, 3 * 32)
    with torch.inference_mode():
        np.testing.assert_allclose(mem(q).numpy(), exhaustive_read(mem, q).numpy(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("msn")
    return {q: load_source(make_checkpoint(root / f"msn-{q}.pt", "msn", dataclasses.replace(msn.tiny(), query=q)))
            for q in msn.QUERIES}


@pytest.mark.parametrize("query,side", [("user", "user"), ("pooled", "item")])
def test_split_says_where_the_memory_read_runs_and_puts_it_there(sources, query: str, side: str) -> None:
    split = pass_by_name("split-user-item")
    result = run_pass(split, initial_bundle(sources[query]), split.options(), [])
    (read,) = result.report["sparse_reads"]
    assert read["side"] == side and read["topks"] == 3     # two sub-key TopKs and the pair TopK
    user, item = result.bundle.segments
    holder = {seg.name: {n for n in (*seg.program.state_dict, *seg.program.constants) if n.startswith("memory.")}
              for seg in (user, item)}
    assert holder[side] == {"memory.keys1", "memory.keys2", "memory.temperature", "memory.values.weight"}
    assert not holder["item" if side == "user" else "user"]
    assert result.report["check_max_abs_diff"] <= 1e-5


class _MeetFirst(torch.nn.Module):
    """User and item ids meet before any matmul, then a TopK-selected table read (per candidate)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(50, 2)

    def forward(self, user_cat: torch.Tensor, item_cat: torch.Tensor) -> torch.Tensor:
        v, i = torch.topk((user_cat + item_cat).float(), 1, dim=-1)
        return self.table(i)[:, 0] * v


def test_split_refusal_names_the_memory_side() -> None:
    batch = torch.export.Dim("batch")
    ids = torch.zeros(5, 3, dtype=torch.int64)
    ep = torch.export.export(_MeetFirst(), (ids, ids), dynamic_shapes=({0: batch}, {0: batch}))
    specs = (TensorSpec("user_cat", "int64", ("batch", 3), "user", 25),
             TensorSpec("item_cat", "int64", ("batch", 3), "item", 25))
    seg = Segment("model", "full", specs, (TensorSpec("logit", "float32", ("batch", 2), "output"),), program=ep)
    with pytest.raises(PreconditionError, match=r"the memory read at topk is item-side"):
        sp.requires(Bundle(source=None, stage="program", segments=(seg,)))  # type: ignore[arg-type]


def test_w8a16_value_table_per_row_int8_survives(sources) -> None:
    source = sources["user"]
    onnx_bundle = to_onnx_stage(initial_bundle(source), source.example_request(2, 16))
    result = quantize_w8a16(onnx_bundle, QuantOptions(embeddings="per-row"))
    (table,) = [x for x in result.report["layers"] if x["name"] == "memory.values.weight"]
    assert table["kind"] == "embedding" and table["shape"] == [1024, 32]
    model = result.bundle.segments[0].onnx
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[table["int8"]].data_type == onnx.TensorProto.INT8
    scales = [n for n in model.graph.node if n.op_type == "Gather" and inits.get(n.input[0]) is not None
              and list(inits[n.input[0]].dims) == [1024, 1]]
    assert scales                                      # per-row scales, gathered with the rows
    assert any(x["name"].startswith("blocks.") for x in result.report["layers"])  # the backbone too
    assert result.report["weight_bytes"]["ratio"] < 0.35
    feeds = source.example_feeds(64, seed=4)
    ref = source.reference(feeds)["logit"]
    got = wm.run_ort(model, feeds)["logit"]
    assert np.abs(got - ref).max() < 5e-2 * max(1.0, np.abs(ref).max())
    # with the bundle's session options (they keep 2-D [K,N] weights out of MatMulNBits: see the pass)
    report = survival_report(model, DEFAULT_OPTIONS)
    assert report["status"] == "PASS", report["failures"]
    assert report["weights"][table["int8"]] == "ok"

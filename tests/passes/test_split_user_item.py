"""split-user-item: structure, numerics (eager vs ONNX Runtime, U users x N candidates), the
per-user cache, the precondition message and metric parity on MovieLens (purity: test_purity.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mixexport.bundle import read_manifest
from mixexport.errors import PreconditionError
from mixexport.models import save_checkpoint, ugsep
from mixexport.passes import split_user_item as sp
from mixexport.pipeline import BuildOptions, build, initial_bundle
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.specs import Request
from tests.conftest import assert_bundle_matches_eager


@pytest.fixture(scope="module")
def ug_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ugsep.Model(ugsep.tiny()).eval()
    for block in model.blocks:  # exercise the U→G compensation edge (zero-initialised by default)
        torch.nn.init.normal_(block.compensation.weight, std=0.05)
    return save_checkpoint(model, tmp_path_factory.mktemp("ug") / "ugsep.pt")


@pytest.fixture(scope="module")
def ug_bundle(ug_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ugb") / "split"
    build(ug_ckpt, BuildOptions(out=out, passes=("split-user-item",), bench=False))
    return out


def test_structure_user_and_item_segments(ug_bundle: Path) -> None:
    m = read_manifest(ug_bundle)
    user, item = m.segments
    assert (user.role, item.role) == ("user", "item")
    assert {s.name for s in user.inputs} == {"user_cat", "seq_items"}
    assert all(s.shape[0] == "users" for s in user.inputs)
    states = [s.name for s in user.outputs]
    # UG-Sep: the item side reads user state of every layer (slices + compensation) and the head's sum
    assert len(states) == 2 * ugsep.tiny().layers + 1
    assert [s.name for s in item.inputs] == states + ["item_cat", "item_dense", "user_index"]
    assert item.outputs[0].shape == ("candidates", 1)
    user_onnx = onnx.load(m.file(user.file))
    assert {i.name for i in user_onnx.graph.input} == {"user_cat", "seq_items"}  # never sees items
    item_onnx = onnx.load(m.file(item.file))
    producers = {o: n for n in item_onnx.graph.node for o in n.output}
    gathers = [n for n in item_onnx.graph.node if n.op_type == "Gather" and n.input[0] in states]
    assert len(gathers) == len(states)  # every state is broadcast to the candidates inside the graph
    for g in gathers:  # … by an index that is user_index (possibly reshaped)
        src = producers.get(g.input[1])
        assert g.input[1] == "user_index" or (src is not None and src.input[0] == "user_index")
    rep = m.data["passes"][0]["report"]
    assert rep["flops_per_user"] > 0 and rep["flops_per_candidate"] < rep["flops_per_row_unsplit"]
    assert rep["predicted_speedup"]["256"] > 1.5 and rep["check_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("users,candidates", [(1, 1), (1, 7), (1, 256), (3, 7), (3, 256)])
def test_split_bundle_matches_eager(ug_bundle: Path, ug_ckpt: Path, users: int, candidates: int) -> None:
    assert_bundle_matches_eager(ug_bundle, ug_ckpt, users, candidates)


def test_cache_hit_and_miss_give_the_same_scores(ug_bundle: Path, ug_ckpt: Path) -> None:
    source = load_source(ug_ckpt)
    req = source.example_request(3, 50, seed=4)
    with Runtime.open(ug_bundle) as rt, Runtime.reference(source) as ref:
        first = rt.score(req)["logit"]
        assert (rt.cache.stats.misses, rt.cache.stats.hits) == (3, 0)
        second = rt.score(req)["logit"]
        assert (rt.cache.stats.misses, rt.cache.stats.hits) == (3, 3)
        assert np.array_equal(first, second)
        # same user id, new history: never served stale
        changed = dict(req.user)
        changed["seq_items"] = np.roll(changed["seq_items"], 1, axis=1)
        req2 = Request(user=changed, item=req.item, user_index=req.user_index, user_ids=req.user_ids)
        np.testing.assert_allclose(rt.score(req2)["logit"], ref.score(req2)["logit"], rtol=1e-5, atol=1e-6)
        assert rt.cache.stats.misses == 6


def test_precondition_names_where_user_meets_item(tiny_ckpt: Path) -> None:
    bundle = initial_bundle(load_source(tiny_ckpt))  # plain RankMixer: tokens mix user and item
    with pytest.raises(PreconditionError) as e:
        sp.requires(bundle)
    msg = e.value.message
    assert "needs user-only computation past the embeddings" in msg
    assert "none is a matrix multiply" in msg and "user inputs meet item inputs at" in msg


def test_movielens_metric_parity_for_split_ugsep(tmp_path: Path) -> None:
    from mixexport.data import movielens_100k
    from mixexport.training import train

    data = movielens_100k(seq_len=32)
    torch.manual_seed(0)
    model = ugsep.Model(ugsep.tiny(data.schema))
    train(model, data, epochs=1, max_steps=40, log=lambda _m: None)
    ckpt = save_checkpoint(model, tmp_path / "ug-ml.pt", {"dataset": data.name})
    result = build(ckpt, BuildOptions(out=tmp_path / "b", bench=False))  # family default: split
    assert [p["name"] for p in result.manifest["passes"]] == ["split-user-item"]
    m = result.parity["metrics"]
    assert m["status"] == "PASS" and abs(m["auc"]["delta"]) <= 1e-4 and result.parity["max_rel"] <= 1e-4


def test_user_cache_stays_within_its_memory_bound_over_100k_users(ug_bundle: Path, ug_ckpt: Path) -> None:
    source = load_source(ug_ckpt)
    base = source.example_request(100, 100, seed=9)  # 100 users per request, one candidate each
    bound = 256 * 1024
    with Runtime.open(ug_bundle, cache_bytes=bound) as rt:
        for r in range(1000):  # 100,000 distinct user ids
            ids = tuple(range(r * 100, (r + 1) * 100))
            rt.score(Request(user=base.user, item=base.item, user_index=base.user_index, user_ids=ids),
                     validate=False)
            assert rt.cache.stats.bytes <= bound
        stats = rt.cache.stats
    per_user = sum(int(np.prod([d for d in s.shape if isinstance(d, int)])) * 4
                   for s in read_manifest(ug_bundle).segments[0].outputs)
    assert stats.misses == 100_000 and stats.entries == bound // per_user
    assert stats.evictions == 100_000 - stats.entries

"""extract-kv-cache: structure, numerics, cache hit/append/miss in the runtime, dynamic sequence
length, the BST refusal and other preconditions, and metric parity on MovieLens (purity:
test_purity.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixexport.bundle import read_manifest
from mixexport.errors import BadInputError, PreconditionError
from mixexport.models import longer, save_checkpoint
from mixexport.passes import extract_kv_cache as kv
from mixexport.pipeline import BuildOptions, build, initial_bundle
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.specs import Request
from tests.cli_helpers import run_cli
from tests.conftest import assert_bundle_matches_eager


@pytest.fixture(scope="module")
def lo_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = longer.Model(longer.tiny()).eval()
    with torch.no_grad():
        model.rel_bias.normal_(std=0.5)  # exercise the relative-position bias (zero-initialised)
    return save_checkpoint(model, tmp_path_factory.mktemp("lo") / "longer.pt")


@pytest.fixture(scope="module")
def lo_bundle(lo_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lob") / "kv"
    build(lo_ckpt, BuildOptions(out=out, bench=False))  # the family default is extract-kv-cache
    return out


def with_ids(req: Request, ids: tuple) -> Request:
    return Request(user=req.user, item=req.item, user_index=req.user_index, user_ids=ids)


def test_structure_cache_user_item(lo_bundle: Path) -> None:
    m = read_manifest(lo_bundle)
    assert [s.role for s in m.segments] == ["cache", "user", "item"]
    cache_seg, user_seg, item_seg = m.segments
    assert [s.name for s in cache_seg.inputs] == ["seq_items"] and cache_seg.inputs[0].shape == ("users", "seq")
    c = longer.tiny()
    for out in cache_seg.outputs:  # the layer-1 K/V of every merged position: [users, heads, groups, dh]
        assert out.shape == ("users", c.heads, "groups", c.dim // c.heads) and out.role == "cache"
    assert "seq_items" not in {s.name for s in item_seg.inputs}  # candidates never touch the sequence
    (cache,) = m.data["caches"]
    assert cache["appendable"] and cache["items_per_position"] == c.merge and cache["input"] == "seq_items"
    assert cache["bytes_per_position"] == 2 * c.dim * 4
    assert m.data["model"]["multiples"] == {"seq": ["groups", c.merge]}
    rep = m.data["passes"][0]["report"]
    assert rep["append"]["appendable"] and rep["append"]["max_abs_diff"] <= 1e-6
    assert rep["predicted_speedup"]["64"]["vs_unsplit_on_miss"] > 2


@pytest.mark.parametrize("users,candidates", [(1, 1), (1, 7), (1, 256), (3, 7), (3, 256)])
def test_kv_bundle_matches_eager(lo_bundle: Path, lo_ckpt: Path, users: int, candidates: int) -> None:
    assert_bundle_matches_eager(lo_bundle, lo_ckpt, users, candidates)


def test_hit_append_and_miss(lo_bundle: Path, lo_ckpt: Path) -> None:
    source = load_source(lo_ckpt)
    req = with_ids(source.example_request(2, 16, seed=3), ("a", "b"))
    k = longer.tiny().merge
    with Runtime.open(lo_bundle) as rt, Runtime.reference(source) as ref:
        trace: dict = {}
        rt.trace = trace
        first = rt.score(req)
        assert rt.kv_stats == {"hits": 0, "appends": 0, "misses": 2}
        assert np.array_equal(rt.score(req)["logit"], first["logit"])
        assert rt.kv_stats["hits"] == 2
        # user "a" gets 3 merged positions' worth of new behaviours; the window slides
        seq = req.user["seq_items"].copy()
        seq[0] = np.concatenate([seq[0, 3 * k:], np.arange(1, 3 * k + 1)])
        slid = with_ids(Request(user={**req.user, "seq_items": seq}, item=req.item, user_index=req.user_index), ("a", "b"))
        trace.clear()
        got = rt.score(slid)["logit"]
        assert rt.kv_stats == {"hits": 3, "appends": 1, "misses": 2}
        assert trace["cache"]["seq_items"].shape == (1, 3 * k)  # only the new items were encoded
        np.testing.assert_allclose(got, ref.score(slid)["logit"], rtol=1e-5, atol=1e-6)
        # an unrelated history for the same id is recomputed, not appended
        seq2 = seq.copy()
        seq2[0] = np.random.default_rng(1).integers(1, 100, size=seq.shape[1])
        other = with_ids(Request(user={**req.user, "seq_items": seq2}, item=req.item, user_index=req.user_index), ("a", "b"))
        np.testing.assert_allclose(rt.score(other)["logit"], ref.score(other)["logit"], rtol=1e-5, atol=1e-6)
        assert rt.kv_stats["misses"] == 3


def test_append_of_one_position(lo_bundle: Path, lo_ckpt: Path) -> None:
    """One new merged position is encoded beside the last kept one (a size-1 axis is no valid
    input of a torch.export program) and only the new one is appended."""
    source = load_source(lo_ckpt)
    req = with_ids(source.example_request(1, 4, seed=5), ("a",))
    k = longer.tiny().merge
    seq = req.user["seq_items"].copy()
    seq[0] = np.concatenate([seq[0, k:], np.arange(1, k + 1)])
    slid = with_ids(Request(user={**req.user, "seq_items": seq}, item=req.item, user_index=req.user_index), ("a",))
    with Runtime.open(lo_bundle) as rt, Runtime.reference(source) as ref:
        rt.score(req)
        trace: dict = {}
        rt.trace = trace
        got = rt.score(slid)["logit"]
        assert rt.kv_stats == {"hits": 0, "appends": 1, "misses": 1}
        assert trace["cache"]["seq_items"].shape == (1, 2 * k)
        np.testing.assert_allclose(got, ref.score(slid)["logit"], rtol=1e-5, atol=1e-6)


def test_longer_sequences_and_growth(lo_bundle: Path, lo_ckpt: Path) -> None:
    source = load_source(lo_ckpt)
    req = source.example_request(1, 5, seed=8)
    long_seq = np.random.default_rng(0).integers(1, 100, size=(1, 128))
    with Runtime.open(lo_bundle) as rt, Runtime.reference(source) as ref:
        r1 = with_ids(Request(user={**req.user, "seq_items": long_seq[:, :96]}, item=req.item,
                              user_index=req.user_index), ("u",))
        r2 = with_ids(Request(user={**req.user, "seq_items": long_seq}, item=req.item,
                              user_index=req.user_index), ("u",))
        for r in (r1, r2):  # a window of 96, then the same history grown to 128: an append, no drop
            np.testing.assert_allclose(rt.score(r)["logit"], ref.score(r)["logit"], rtol=1e-5, atol=1e-6)
        assert rt.kv_stats["appends"] == 1
        bad = Request(user={**req.user, "seq_items": long_seq[:, :66]}, item=req.item, user_index=req.user_index)
        with pytest.raises(BadInputError, match="expected a multiple of 4"):
            rt.score(bad)
        short = Request(user={**req.user, "seq_items": long_seq[:, :28]}, item=req.item, user_index=req.user_index)
        with pytest.raises(BadInputError, match=r"the seq axis is 28, expected at least 32 \(8 groups of 4 items\)"):
            rt.score(short)  # the model reads the last recent = 8 merged positions


class BST(torch.nn.Module):
    """Behaviour Sequence Transformer: the candidate is appended to the sequence and attends with it."""

    def __init__(self) -> None:
        super().__init__()
        self.items = torch.nn.Embedding(50, 16)
        self.user = torch.nn.Embedding(20, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = torch.nn.Linear(32, 1)

    def forward(self, user_id, item_id, seq_items):
        tokens = torch.cat([self.items(seq_items), self.items(item_id).unsqueeze(1)], dim=1)  # [B,S+1,16]
        q = tokens
        scores = torch.matmul(q, tokens.transpose(1, 2)) / 4.0
        mixed = torch.matmul(torch.softmax(scores, dim=-1), tokens)
        return self.out(torch.cat([mixed.mean(1), self.user(user_id)], dim=1))


def test_bst_style_model_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
    args = (torch.randint(0, 20, (3,)), torch.randint(0, 50, (3,)), torch.randint(0, 50, (3, 8)))
    ep = torch.export.export(BST().eval(), args, dynamic_shapes=({0: b}, {0: b}, {0: b, 1: s}))
    pt2 = tmp_path / "bst.pt2"
    torch.export.save(ep, pt2)
    bundle = initial_bundle(load_source(pt2))
    with pytest.raises(PreconditionError) as e:
        kv.requires(bundle)
    assert "BST-style" in e.value.message and "['item_id']" in e.value.message
    r = run_cli("build", str(pt2), "--passes", "extract-kv-cache", "--out", str(tmp_path / "b"), "--no-bench")
    assert r.code == 2 and "BST-style" in r.err and not (tmp_path / "b").exists()


def test_other_preconditions(tiny_ckpt: Path) -> None:
    with pytest.raises(PreconditionError, match="found no attention over the sequence input 'seq_items'"):
        kv.requires(initial_bundle(load_source(tiny_ckpt)))


def test_movielens_metric_parity_for_kv_longer(tmp_path: Path) -> None:
    from mixexport.data import movielens_100k
    from mixexport.training import train

    data = movielens_100k(seq_len=longer.MOVIELENS_SEQ_LEN)
    torch.manual_seed(0)
    model = longer.Model(longer.tiny(data.schema))
    train(model, data, epochs=1, max_steps=30, log=lambda _m: None)
    ckpt = save_checkpoint(model, tmp_path / "lo-ml.pt", {"dataset": data.name})
    result = build(ckpt, BuildOptions(out=tmp_path / "b", bench=False))
    m = result.parity["metrics"]
    assert m["status"] == "PASS" and abs(m["auc"]["delta"]) <= 1e-4 and result.parity["max_rel"] <= 1e-4
    assert [c["check"] for c in result.parity["cache"]] == ["hit equals miss", "kv append"]
    assert all(c["passed"] for c in result.parity["cache"])


def test_the_runner_plans_once(lo_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """requires() and run() share one plan of the same bundle (planning analyses the whole graph);
    a different bundle object is planned afresh."""
    from mixexport.passes.options import ExtractKvCacheOptions
    from mixexport.pipeline import run_pass

    calls: list[int] = []
    real = kv._plan
    monkeypatch.setattr(kv, "_plan", lambda b: calls.append(id(b)) or real(b))
    bundle = initial_bundle(load_source(lo_ckpt))
    result = run_pass(kv.PASS, bundle, ExtractKvCacheOptions(), [])
    assert len(calls) == 1 and [s.role for s in result.bundle.segments] == ["cache", "user", "item"]
    kv.requires(initial_bundle(load_source(lo_ckpt)))
    assert len(calls) == 2

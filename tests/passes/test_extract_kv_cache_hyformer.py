"""extract-kv-cache on HyFormer: every layer's K/V of both sequences (the history, per position; the
recent window, fixed) are cache tensors declared in the manifest; appendability is derived both ways
(position-wise encoder: appendable, appends recompute only the new positions and the window;
self-attention encoder: not appendable, a changed history is a miss); hit == miss == eager for
several users × N candidates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixexport.bundle import read_manifest
from mixexport.models import hyformer
from mixexport.models.common import FeatureSchema
from mixexport.pipeline import BuildOptions, build
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.specs import Request
from tests.conftest import make_checkpoint

#: One layer, a 16-item history and a 4-item recent window: every structure, the least export time.
CONFIG = hyformer.Config(schema=FeatureSchema(seq_len=16), dim=32, recent=4, layers=1)


@pytest.fixture(scope="module", params=hyformer.ENCODERS)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(f"hy-{request.param}")
    ckpt = make_checkpoint(root / "h.pt", "hyformer", dataclasses.replace(CONFIG, encoder=request.param))
    out = root / "kv"
    build(ckpt, BuildOptions(out=out, bench=False))  # the family default is extract-kv-cache
    return request.param, ckpt, out


def with_seq(req: Request, seq: np.ndarray, ids: tuple) -> Request:
    return Request(user={**req.user, "seq_items": seq}, item=req.item, user_index=req.user_index, user_ids=ids)


def test_every_layers_kv_of_every_sequence_is_cached(built: tuple[str, Path, Path]) -> None:
    encoder, _, out = built
    m = read_manifest(out)
    assert [s.role for s in m.segments] == ["cache", "user", "item"]
    (cache,) = m.data["caches"]
    layout = cache["layout"]
    kv = {n: e for n, e in layout.items() if e["kind"] in ("keys", "values")}
    # 2 sequences x 1 layer x (K, V) of the queries' cross attentions (the self-attention encoder's
    # own attentions are sequence-internal: nothing of them crosses to the candidates)
    attentions = sorted({e["attention"] for e in kv.values()})
    assert len(attentions) == 2
    assert sorted((e["attention"], e["kind"]) for e in kv.values()) == [(a, k) for a in attentions
                                                                        for k in ("keys", "values")]
    windows = {n for n, e in kv.items() if e["positions"] == "window"}
    assert len(windows) == 2 and all(layout[n]["window"] == CONFIG.recent for n in windows)
    shapes = {s.name: s.shape for s in m.segments[0].outputs}
    for n in kv:
        dims = shapes[n]
        assert dims[0] == "users" and dims[cache["seq_axis"][n]] == (CONFIG.recent if n in windows else "groups")
    rep = m.data["passes"][0]["report"]
    assert rep["append"]["window_tensors"] == sorted(windows)
    # derived, not assumed: position-wise K/V are independent per position, self-attention's are not
    assert cache["appendable"] is (encoder == "swiglu") is rep["append"]["appendable"]
    if encoder == "attention":
        assert "changed" in rep["append"]["reason"] and rep["append"]["max_abs_diff"] > 1e-3
    parity = json.loads((out / "reports" / "parity.json").read_text())
    cache_checks = {c["check"]: c for c in parity["cache"]}  # verify: hit == miss, append == eager
    assert cache_checks["hit equals miss"]["passed"] and cache_checks["kv append"]["passed"]
    assert ("appends_used" in cache_checks["kv append"]) is (encoder == "swiglu")


def test_hit_miss_append_match_eager(built: tuple[str, Path, Path]) -> None:
    encoder, ckpt, out = built
    source = load_source(ckpt)
    req = source.example_request(3, 16, seed=4)
    req = Request(user=req.user, item=req.item, user_index=req.user_index, user_ids=("a", "b", "c"))
    with Runtime.open(out) as rt, Runtime.reference(source) as ref:
        trace: dict = {}
        rt.trace = trace
        first = rt.score(req)["logit"]
        np.testing.assert_allclose(first, ref.score(req)["logit"], rtol=1e-5, atol=1e-6)
        assert np.array_equal(rt.score(req)["logit"], first)  # hit == miss
        assert rt.kv_stats == {"hits": 3, "appends": 0, "misses": 3}
        seq = req.user["seq_items"].copy()
        seq[0] = np.concatenate([seq[0, 2:], [7, 9]])  # user "a": two new behaviours, the window slides
        slid = with_seq(req, seq, req.user_ids)
        trace.clear()
        got = rt.score(slid)["logit"]
        np.testing.assert_allclose(got, ref.score(slid)["logit"], rtol=1e-5, atol=1e-6)
        if encoder == "swiglu":  # encoded: the 2 new items plus what the recent window needs
            assert rt.kv_stats == {"hits": 5, "appends": 1, "misses": 3}
            assert trace["cache"]["seq_items"].shape == (1, CONFIG.recent)
        else:  # a changed history is rebuilt
            assert rt.kv_stats == {"hits": 5, "appends": 0, "misses": 4}
            assert trace["cache"]["seq_items"].shape == (1, CONFIG.schema.seq_len)


def test_recent_window_is_a_second_sequence() -> None:
    """Changing only the oldest item moves the output through the history alone; the recent window's
    K/V (and so its queries' reads) depend on the last ``recent`` items only."""
    torch.manual_seed(0)
    model = hyformer.Model(CONFIG).eval()
    feeds = {k: torch.from_numpy(v) for k, v in model.example_inputs(2, seed=1).items()}
    feeds["seq_items"][:, 0] = 3
    old = feeds["seq_items"].clone()
    old[:, 0] = 5
    with torch.no_grad():
        assert not torch.allclose(model(**feeds), model(**{**feeds, "seq_items": old}))
        model.seq_proj[0].weight.zero_()  # the history sees nothing: only the window remains
        model.seq_proj[0].bias.zero_()
        assert torch.allclose(model(**feeds), model(**{**feeds, "seq_items": old}))


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="encoder must be one of"):
        hyformer.Config(encoder="lstm")
    with pytest.raises(ValueError, match=r"divisible by heads \(4\) and by the token count"):
        hyformer.Config(dim=60)
    with pytest.raises(ValueError, match="at least recent"):
        hyformer.Config(schema=FeatureSchema(seq_len=4), recent=8)

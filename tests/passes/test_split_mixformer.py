"""split-user-item on MixFormer: UI-MixFormer's user heads and the sequence K/V go to the user
segment (structure, U users x N candidates against the eager model); plain MixFormer is refused
with the edge where the user features meet items, and builds and verifies without the pass.
MovieLens metric parity of the split: ``slow``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
import torch

from mixexport.bundle import read_manifest
from mixexport.models import mixformer, save_checkpoint
from mixexport.pipeline import BuildOptions, build
from tests.cli_helpers import run_cli
from tests.conftest import assert_bundle_matches_eager, make_checkpoint


@pytest.fixture(scope="module")
def ui_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mf") / "ui.pt", "mixformer", mixformer.tiny())


@pytest.fixture(scope="module")
def ui_bundle(ui_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mfb") / "split"
    result = build(ui_ckpt, BuildOptions(out=out, bench=False))          # the family's default passes
    assert [p["name"] for p in result.manifest["passes"]] == ["split-user-item"]
    return out


def test_user_segment_holds_the_user_heads_and_the_sequence_kv(ui_bundle: Path) -> None:
    c = mixformer.tiny()
    hi, s, d = c.heads - c.user_heads, c.schema.seq_len, c.dim
    m = read_manifest(ui_bundle)
    user, item = m.segments
    assert {i.name for i in onnx.load(m.file(user.file)).graph.input} == {"user_cat", "seq_items"}
    shapes = [tuple(o.shape) for o in user.outputs]
    # per layer, the item heads' keys [Hi,U,D,S] and values [Hi,U,S,D] arrive computed
    assert shapes.count((hi, "users", d, s)) == c.layers and shapes.count((hi, "users", s, d)) == c.layers
    # … and the user heads' slices that the item heads mix in ([Hi,U,Hu·D/H]), of every layer
    assert shapes.count((hi, "users", c.user_heads * d // c.heads)) == c.layers
    assert [i.name for i in item.inputs][-3:] == ["item_cat", "item_dense", "user_index"]
    rep = m.data["passes"][0]["report"]
    # per candidate only the item heads run: at most half the unsplit row's FLOPs in the tiny config
    assert rep["flops_per_candidate"] < 0.5 * rep["flops_per_row_unsplit"]
    assert rep["predicted_speedup"]["256"] > 2 and rep["check_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("users,candidates", [(1, 1), (1, 256), (3, 7), (3, 256)])
def test_split_bundle_matches_eager(ui_bundle: Path, ui_ckpt: Path, users: int, candidates: int) -> None:
    assert_bundle_matches_eager(ui_bundle, ui_ckpt, users, candidates)


def test_plain_mixformer_is_refused_with_the_edge_and_builds_without_the_split(tmp_path: Path) -> None:
    cfg = dataclasses.replace(mixformer.tiny(), ui=False, layers=1)
    ckpt = make_checkpoint(tmp_path / "plain.pt", "mixformer", cfg)
    r = run_cli("build", str(ckpt), "--passes", "split-user-item", "--out", str(tmp_path / "x"), "--no-bench")
    assert r.code == 2 and "Traceback" not in r.err and not (tmp_path / "x").exists()
    assert "split-user-item needs user-only computation past the embeddings" in r.err
    assert "user inputs meet item inputs at cat" in r.err and "that edge makes the user side depend on items" in r.err
    assert "read the sequence alone (seq_items)" in r.err and "mixformer with ui=true" in r.err
    ok = run_cli("build", str(ckpt), "--out", str(tmp_path / "b"), "--no-bench", "--json")  # defaults: none
    assert ok.code == 0, ok.err
    data = json.loads(ok.out)
    assert data["parity"]["status"] == "PASS" and data["parity"]["max_rel"] <= 1e-4
    assert data["manifest"]["passes"] == []
    assert [s.name for s in read_manifest(tmp_path / "b").segments] == ["model"]


@pytest.mark.slow
def test_movielens_metric_parity_for_split_mixformer(tmp_path: Path) -> None:
    from mixexport.data import movielens_100k
    from mixexport.training import train

    data = movielens_100k(seq_len=32)
    torch.manual_seed(0)
    model = mixformer.Model(mixformer.tiny(data.schema))
    train(model, data, epochs=1, max_steps=40, log=lambda _m: None)
    ckpt = save_checkpoint(model, tmp_path / "mf-ml.pt", {"dataset": data.name})
    result = build(ckpt, BuildOptions(out=tmp_path / "b", bench=False))
    assert [p["name"] for p in result.manifest["passes"]] == ["split-user-item"]
    m = result.parity["metrics"]
    assert m["status"] == "PASS" and abs(m["auc"]["delta"]) <= 1e-4 and result.parity["max_rel"] <= 1e-4

"""Pyramid Mixer: config checks, the pyramid's shapes and padding, the MovieLens multi-behaviour
features, and split-user-item moving the whole pyramid into the user segment (proven against the
unsplit program by the pass's own postcondition)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixexport.data import movielens_100k
from mixexport.models import FAMILIES, pyramid_mixer as pm
from mixexport.models.common import FeatureSchema
from mixexport.passes.order import pass_by_name
from mixexport.pipeline import initial_bundle, run_pass
from mixexport.source import load_source
from tests.conftest import make_checkpoint


def test_registered_with_default_split() -> None:
    assert FAMILIES["pyramid-mixer"] is pm and pm.DEFAULT_PASSES == ("split-user-item",)
    c = pm.tiny()
    assert (c.periods, c.interest_tokens, c.tokens) == (2, 6, 8)
    with pytest.raises(ValueError, match="divisible by pool"):
        pm.Config(schema=FeatureSchema(behaviour_len=12))
    with pytest.raises(ValueError, match="needs behaviour_len"):
        pm.Config(schema=FeatureSchema())
    with pytest.raises(ValueError, match="token count"):
        pm.Config(dim=60)


def test_pyramid_pools_adjacent_windows_and_ignores_padding() -> None:
    torch.manual_seed(0)
    model = pm.Model(pm.tiny()).eval()
    feeds = {k: torch.from_numpy(v) for k, v in model.example_inputs(4, seed=1).items()}
    beh = feeds["seq_behaviours"].clone()
    beh[0] = 0                                     # row 0: no behaviour at all
    beh[1, :, :8] = 0                              # row 1: first 8 positions padded in every type
    with torch.inference_mode():
        tokens = model.pyramid(beh)                # [Nb·P_L, B, F·e]
        assert tokens.shape == (6, 4, 4 * 16)
        assert torch.count_nonzero(tokens[:, 0]) == 0          # empty windows pool to zero
        # row 1: the first window (positions 0..7) of every type is empty, the second is not
        first = tokens[:, 1].reshape(3, 2, -1)
        assert torch.count_nonzero(first[:, 0]) == 0 and torch.count_nonzero(first[:, 1]) > 0
        # padding is ignored: other attribute ids at padded positions change nothing
        noisy = beh.clone()
        noisy[1, :, :8, 1:] = 3
        assert torch.equal(model.pyramid(noisy)[:, 1], tokens[:, 1])
        # a real behaviour in the first window changes it
        moved = beh.clone()
        moved[1, :, 0] = beh[1, :, 8]
        assert not torch.equal(model.pyramid(moved)[:, 1], tokens[:, 1])


def test_movielens_behaviours_are_typed_by_rating_and_strictly_earlier() -> None:
    data = movielens_100k(seq_len=32, behaviour_len=16)
    assert data.schema.behaviour_len == 16 and data.schema.behaviour_vocab[0] == data.schema.seq_vocab
    train, test = data.train.feeds, data.test.feeds
    beh = train["seq_behaviours"]
    assert beh.shape == (len(data.train), 3, 16, 4)
    # the items of all types together are items of the flat history (most recent seq_len items)
    row = int(np.argmax((beh[..., 0] > 0).sum((1, 2)) > 20))
    items = set(beh[row, ..., 0][beh[row, ..., 0] > 0].tolist())
    recent = set(train["seq_items"][row][train["seq_items"][row] > 0].tolist())
    assert items and items & recent
    # padding is left padding and pads every attribute
    valid = beh[..., 0] > 0
    assert not (valid[..., :-1] & ~valid[..., 1:]).any()
    assert (beh[~valid] == 0).all()
    # test rows of one user share their behaviours (one request per user scores at the split time)
    key = data.test.user_key
    first = {k: i for i, k in reversed(list(enumerate(key.tolist())))}
    idx = np.asarray([first[k] for k in key.tolist()])
    assert np.array_equal(test["seq_behaviours"], test["seq_behaviours"][idx])


def test_split_moves_the_whole_pyramid_into_the_user_segment(tmp_path) -> None:
    source = load_source(make_checkpoint(tmp_path / "pm.pt", "pyramid-mixer", pm.tiny()))
    split = pass_by_name("split-user-item")
    result = run_pass(split, initial_bundle(source), split.options(), [])
    user, item = result.bundle.segments
    consts = {seg.name: {n.split(".")[0] for n in (*seg.program.state_dict, *seg.program.constants)}
              for seg in (user, item)}
    assert {"pyramid", "interest_proj", "user_tokenizer"} <= consts["user"]
    assert not {"pyramid", "interest_proj", "user_tokenizer"} & consts["item"]
    assert {"item_tokenizer", "blocks", "head"} <= consts["item"]
    assert [s.name for s in user.inputs] == ["user_cat", "seq_items", "seq_behaviours"]
    report = result.report
    # one boundary: the interest + user tokens [Ti+Tu, users, D]
    assert [b["shape"] for b in report["boundary"]] == [[7, "users", 64]]
    assert report["check_max_abs_diff"] <= 1e-5 and report["sparse_reads"] == []
    assert report["flops_per_user"] > 0 and report["predicted_speedup"]["1024"] > 1.5

"""MovieLens-100k from the recbole wheel: features, the time-ordered split, sequence semantics."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from mixexport.data import movielens_100k, movielens_available
from mixexport.errors import EnvironmentUnavailableError
from mixexport.models import FeatureSchema, random_feeds


def test_movielens_features_and_split() -> None:
    ds = movielens_100k(seq_len=32)
    assert ds.info["train_rows"] + ds.info["test_rows"] == 100_000
    assert 0.19 < ds.info["test_rows"] / 100_000 < 0.21
    s = ds.schema
    assert s.user_vocab[0] == 944 and s.item_vocab[0] == 1683 and s.item_dense == 19 and s.seq_len == 32
    for split in (ds.train, ds.test):
        f = split.feeds
        for name, vocab in (("user_cat", s.user_vocab), ("item_cat", s.item_vocab)):
            assert (f[name] >= 0).all() and (f[name] < np.asarray(vocab)).all()
        assert set(np.unique(split.label)) <= {0.0, 1.0}
    assert 0.5 < ds.train.label.mean() < 0.6  # rating >= 4 is ~55 % of MovieLens-100k


def test_test_rows_share_their_users_history_at_split_time() -> None:
    ds = movielens_100k(seq_len=32)
    test = ds.test
    for uid in np.unique(test.user_key)[:50]:
        rows = np.flatnonzero(test.user_key == uid)
        seqs = test.feeds["seq_items"][rows]
        assert (seqs == seqs[0]).all(), "a request's candidates must see one history"
    # every history item of a test user was rated by that user in the training split
    uid = test.user_key[0]
    hist = set(test.feeds["seq_items"][0][test.feeds["seq_items"][0] > 0].tolist())
    train_items = set(ds.train.feeds["item_cat"][ds.train.user_key == uid, 0].tolist())
    assert hist <= train_items


def test_training_sequences_only_look_back() -> None:
    ds = movielens_100k(seq_len=8)
    tr = ds.train
    rows = np.flatnonzero(tr.user_key == tr.user_key[0])
    # within one user (rows are in time order), the history grows by the previous row's item
    first, second = tr.feeds["seq_items"][rows[0]], tr.feeds["seq_items"][rows[1]]
    assert (first == 0).all() or first[-1] != 0
    assert second[-1] in (tr.feeds["item_cat"][rows[0], 0], second[-1])


def test_requests_group_rows_by_user() -> None:
    ds = movielens_100k(seq_len=32)
    specs = FeatureSchema(**{**ds.schema.__dict__}).input_specs()
    reqs = ds.test.requests(specs)
    assert len(reqs) == ds.info["test_users"]
    r = reqs[0]
    assert r.num_users == 1 and r.num_candidates == len(r.meta["rows"])
    rows = r.rows()
    for name, arr in rows.items():
        np.testing.assert_array_equal(arr, ds.test.feeds[name][r.meta["rows"]])


def test_missing_recbole_is_a_clear_environment_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "recbole" else real(name, *a))
    movielens_100k.cache_clear()
    try:
        assert "recbole" in movielens_available()
        with pytest.raises(EnvironmentUnavailableError) as e:
            movielens_100k(seq_len=7)
        assert e.value.hint == "pip install --no-deps recbole==1.2.1"
    finally:
        monkeypatch.undo()
        movielens_100k.cache_clear()


def test_random_feeds_respect_each_columns_vocab() -> None:
    schema = FeatureSchema(user_vocab=(3, 50), item_vocab=(2,), item_dense=4, seq_len=5, seq_vocab=9)
    f = random_feeds(schema, 200, seed=1)
    assert f["user_cat"][:, 0].max() < 3 and f["user_cat"][:, 1].max() < 50 and f["item_cat"].max() < 2
    assert f["seq_items"].max() < 9


def test_random_ids_are_non_padding_and_inside_each_columns_vocab() -> None:
    from mixexport.specs import TensorSpec, check_feeds, random_ids

    spec = TensorSpec("user_cat", "int32", ("batch", 3), "user", (2, 50, 1))
    ids = random_ids(spec, (500, 3), np.random.default_rng(0))
    assert ids.dtype == np.int32 and check_feeds((spec,), {"user_cat": ids}) == {"batch": 500}
    assert ids[:, 0].min() == ids[:, 0].max() == 1 and ids[:, 1].min() >= 1 and not ids[:, 2].any()
    seq = random_ids(TensorSpec("seq_items", "int64", ("batch", "seq"), "sequence", 9), (4, 6), np.random.default_rng(1))
    assert seq.shape == (4, 6) and 1 <= seq.min() and seq.max() < 9

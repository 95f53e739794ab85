"""Id ranges found through the graph (mixexport/program/ids.py): casts, per-column offsets, hashing,
clamps and int32 ids; example requests across the ranges; bad ids refused before anything runs;
verify refusing to PASS on constant ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixexport.errors import BadInputError
from mixexport.runtime import Runtime
from mixexport.source import Source, load_source
from mixexport.specs import IdRange, Request
from tests.cli_helpers import run_cli

B = torch.export.Dim("batch")


class IdModel(torch.nn.Module):
    """Every way an id reaches a table in third-party recommenders, in one tiny model."""

    def __init__(self) -> None:
        super().__init__()
        d = 8
        self.user = torch.nn.Embedding(20, d, padding_idx=0)
        self.items = torch.nn.Embedding(40, d, padding_idx=0)     # DIN: target and history share it
        self.fields = torch.nn.Embedding(45, d)                    # FeaturesEmbedding: one table, offsets
        self.register_buffer("offsets", torch.tensor([0, 10, 30]))
        self.hashed = torch.nn.Embedding(64, d)
        self.small = torch.nn.Embedding(7, d)
        self.clamped = torch.nn.Embedding(30, d)
        self.att = torch.nn.Linear(2 * d, 1)
        self.out = torch.nn.Linear(6 * d, 1)

    def forward(self, user_id, item_id, item_feats, item_hash, item_small, seq_items, seq_clamped):
        u = self.user(user_id.long())                                   # cast
        target = self.items(item_id.long())                             # [B, d]
        hist = self.items(seq_items.long())                             # int32 history, cast: [B, T, d]
        w = self.att(torch.cat([hist, target[:, None].expand_as(hist)], -1)).softmax(1)
        din = (w * hist).sum(1)
        fields = self.fields(item_feats + self.offsets).sum(1)          # per-column offsets
        h = self.hashed(item_hash % 64)                                 # hashing
        s = self.small(item_small)                                      # int32 ids, direct
        c = self.clamped(seq_clamped.clamp(0, 29)).mean(1)              # clamp
        return self.out(torch.cat([u + target, din, fields, h, s, c], 1))


class UnknownModel(torch.nn.Module):
    """An int input that reaches no table (a count used as a number): no range can be found."""

    def __init__(self) -> None:
        super().__init__()
        self.item = torch.nn.Embedding(12, 4)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, user_visits, item_id):
        return self.out(self.item(item_id)) * (1 + user_visits.float()[:, None] / 10)


def _save(model: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> Path:
    torch.manual_seed(0)
    ep = torch.export.export(model.eval(), args, dynamic_shapes=tuple({0: B} for _ in args))
    torch.export.save(ep, path)
    return path


def _id_model(path: Path) -> Path:
    torch.manual_seed(0)
    n = 4
    args = (torch.randint(0, 20, (n,)), torch.randint(0, 40, (n,)), torch.randint(0, 10, (n, 3)),
            torch.randint(0, 1000, (n,)), torch.randint(0, 7, (n,), dtype=torch.int32),
            torch.randint(0, 40, (n, 5), dtype=torch.int32), torch.randint(0, 30, (n, 4)))
    return _save(IdModel(), args, path)


@pytest.fixture(scope="module")
def id_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _id_model(tmp_path_factory.mktemp("ids") / "ids.pt2")


@pytest.fixture(scope="module")
def id_source(id_program: Path) -> Source:
    return load_source(id_program)


@pytest.fixture(scope="module")
def id_bundle(id_program: Path) -> Path:
    out = id_program.parent / "bundle"
    r = run_cli("build", str(id_program), "--out", str(out), "--no-bench")
    assert r.code == 0, r.err
    return out


def _ranges(source_or_specs) -> dict:
    specs = getattr(source_or_specs, "inputs", source_or_specs)
    return {s.name: [None if r is None else (r.low, r.high) for r in s.id_ranges() or ()]
            for s in specs if s.dtype.startswith("int")}


EXPECTED = {"user_id": [(0, 20)], "item_id": [(0, 40)], "item_feats": [(0, 10), (0, 20), (0, 15)],
            "item_hash": [(0, None)], "item_small": [(0, 7)], "seq_items": [(0, 40)], "seq_clamped": [(0, None)]}


def test_ranges_are_found_through_casts_offsets_hashing_and_clamps(id_source: Source) -> None:
    source = id_source
    assert _ranges(source) == EXPECTED
    specs = {s.name: s for s in source.inputs}
    assert specs["seq_items"].dtype == "int32" and specs["seq_items"].ids[0].padding == 0
    assert specs["item_feats"].vocab == (10, 20, 15)  # the older field, for readers that know only it
    assert specs["item_hash"].vocab is None and "% 64" in specs["item_hash"].ids[0].via
    assert not [n for n in source.notes if n.startswith("warning")], source.notes


def test_example_ids_cover_each_range_with_and_beyond_padding(id_source: Source) -> None:
    feeds = id_source.example_feeds(400, seed=3)
    for name, ranges in EXPECTED.items():
        arr = feeds[name].reshape(400, -1) if len(ranges) > 1 else feeds[name].reshape(-1, 1)
        for k, (low, high) in enumerate(ranges):
            col = arr[:, k]
            top = high if high is not None else 3 * {"item_hash": 64, "seq_clamped": 30}[name]
            assert col.min() == low and col.max() == top - 1, (name, k, col.min(), col.max())
            assert (col == low).mean() < 0.5  # the padding id is in, but not only it
    # the hashed and clamped ids go past their table: the wrap and the clamp are exercised
    assert (feeds["item_hash"] >= 64).any() and (feeds["seq_clamped"] >= 30).any()


def test_build_records_ranges_and_samples_across_them(id_bundle: Path) -> None:
    manifest = json.loads((id_bundle / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["model"]["inputs"]}
    assert [(r["low"], r["high"]) for r in entries["item_feats"]["ids"]] == EXPECTED["item_feats"]
    assert entries["item_hash"]["ids"] == [{"low": 0, "high": None, "rows": 64, "via": "x % 64 indexes 64 rows"}]
    sample = Request.from_npz_dict(dict(np.load(id_bundle / "inputs/sample.npz")))
    assert np.unique(sample.item["item_id"]).size > 3 and np.unique(sample.user["seq_items"]).size > 3
    r = run_cli("verify", str(id_bundle))
    assert r.code == 0 and "not checked" not in r.out, r.out + r.err


@pytest.mark.parametrize("name,where,value,expect", [
    ("item_feats", (1, 1), -1, "item input 'item_feats' column 1: 1 id outside its vocabulary (expected 0 <= id < 20), "
                               "first -1 at index [1, 1]"),
    ("item_feats", (0, 0), 10, "column 0: 1 id outside its vocabulary (expected 0 <= id < 10)"),
    ("item_id", (2,), 40, "item input 'item_id': 1 id outside its vocabulary (expected 0 <= id < 40), first 40"),
    ("user_id", (0,), 20, "user input 'user_id': 1 id outside its vocabulary (expected 0 <= id < 20)"),
    ("item_hash", (3,), -1, "item input 'item_hash': 1 id outside its vocabulary (expected id >= 0)"),
    ("seq_items", (0, 4), -1, "user input 'seq_items': 1 id outside its vocabulary (expected 0 <= id < 40)"),
])
def test_runtime_refuses_bad_ids_before_running(id_bundle: Path, id_source: Source, name: str, where: tuple,
                                                value: int, expect: str) -> None:
    source = id_source
    req = source.example_request(1, 4, seed=9)
    part = "user" if name in req.user else "item"
    arr = getattr(req, part)[name].copy()
    arr[where] = value
    bad = Request(**{**req.__dict__, part: {**getattr(req, part), name: arr}})
    with Runtime.open(id_bundle) as rt:
        with pytest.raises(BadInputError) as e:
            rt.score(bad)
    assert expect in e.value.message and "\n" not in e.value.message, e.value.message
    assert "never wrapped" in e.value.hint


def test_runtime_refuses_wrong_id_dtype_and_serves_hashed_ids_like_eager(id_bundle: Path, id_source: Source) -> None:
    source = id_source
    req = source.example_request(1, 5, seed=4)
    wrong = Request(**{**req.__dict__, "item": {**req.item, "item_small": req.item["item_small"].astype(np.int64)}})
    with Runtime.open(id_bundle) as rt, Runtime.reference(source) as ref:
        with pytest.raises(BadInputError, match="'item_small': expected dtype int32, found int64"):
            rt.score(wrong)
        big = Request(**{**req.__dict__, "item": {**req.item, "item_hash": np.full(5, 10**12, dtype=np.int64)}})
        np.testing.assert_allclose(rt.score(big)["output"], ref.score(big)["output"], rtol=1e-5, atol=1e-6)


def test_verify_refuses_bad_ids_in_data_in_one_line(id_bundle: Path, id_source: Source, tmp_path: Path) -> None:
    feeds = id_source.example_feeds(8, seed=2)
    feeds["item_feats"][3, 2] = 15  # column 2 owns rows 30..44 of the shared table: 15 ids
    np.savez(tmp_path / "bad.npz", **feeds, label=np.zeros(8, dtype=np.float32))
    r = run_cli("verify", str(id_bundle), "--data", str(tmp_path / "bad.npz"))
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert "'item_feats' column 2: 1 id outside its vocabulary (expected 0 <= id < 15)" in r.err


def test_no_range_warns_and_verify_refuses_to_pass_on_constant_ids(tmp_path: Path) -> None:
    pt2 = _save(UnknownModel(), (torch.randint(0, 9, (4,)), torch.randint(0, 12, (4,))), tmp_path / "unknown.pt2")
    r = run_cli("inspect", str(pt2))
    assert r.code == 0 and "warning: int input user_visits: no id range found" in r.out, r.out
    r = run_cli("build", str(pt2), "--out", str(tmp_path / "b"), "--no-bench")
    assert r.code == 1 and "tensor parity not checked" in r.err and not (tmp_path / "b").exists(), r.out + r.err
    r = run_cli("build", str(pt2), "--out", str(tmp_path / "b"), "--no-bench", "--keep-failed")
    assert r.code == 1 and (tmp_path / "b" / "manifest.json").is_file()
    assert "not checked" in (tmp_path / "b" / "reports" / "report.md").read_text()
    r = run_cli("verify", str(tmp_path / "b"))
    assert r.code == 1 and r.out.startswith("NOT CHECKED") and "not checked (worst" in r.out, r.out
    assert "pass --data FILE.npz with real rows" in r.err
    rng = np.random.default_rng(0)
    rows = {"user_visits": np.repeat(rng.integers(0, 50, 6), 4), "item_id": rng.integers(0, 12, 24),
            "label": rng.integers(0, 2, 24).astype(np.float32)}
    np.savez(tmp_path / "real.npz", **rows)
    r = run_cli("verify", str(tmp_path / "b"), "--data", str(tmp_path / "real.npz"))
    assert r.code == 0 and r.out.startswith("PASS") and "metric parity stands in" in r.out, r.out + r.err


class StackedModel(torch.nn.Module):
    """Fields stacked into one shared table (deepctr's DeepFM), one of them hashed; a candidate
    appended to the history (BST); 1-based ids (``x - 1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.tensor([0, 6, 17]))
        self.fields = torch.nn.Embedding(21, 4)             # user_id: 6 rows, user_city: 11, item_cat: 4
        self.items = torch.nn.Embedding(9, 4, padding_idx=0)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, user_id, user_city, item_cat, seq_items, item_id):
        idx = torch.stack([user_id, user_city % 11, item_cat], 1) + self.offsets      # [B, 3]
        tokens = torch.cat([seq_items, (item_id - 1).unsqueeze(1)], 1)               # [B, T+1]
        return self.out(torch.cat([self.fields(idx).sum(1), self.items(tokens).mean(1)], 1))


def test_ranges_through_stacked_fields_and_a_concatenated_candidate(tmp_path: Path) -> None:
    args = (torch.randint(0, 6, (4,)), torch.randint(0, 10**5, (4,)), torch.randint(0, 4, (4,)),
            torch.randint(0, 9, (4, 3)), torch.randint(1, 10, (4,)))
    source = load_source(_save(StackedModel(), args, tmp_path / "stacked.pt2"))
    assert _ranges(source) == {"user_id": [(0, 6)], "user_city": [(0, None)], "item_cat": [(0, 4)],
                               "seq_items": [(0, 9)], "item_id": [(1, 10)]}
    specs = {s.name: s for s in source.inputs}
    assert "its slice 0..6" in specs["user_id"].ids[0].via and specs["seq_items"].ids[0].padding == 0
    assert specs["item_id"].ids[0].padding == 1 and specs["item_id"].vocab is None  # 1-based: id 1 is row 0


def test_old_manifest_vocab_still_reads_as_a_range() -> None:
    from mixexport.specs import TensorSpec

    old = TensorSpec.from_json({"name": "item_cat", "dtype": "int64", "shape": ["batch", 2], "role": "item",
                                "vocab": [5, 3]})
    assert old.ids is None and old.id_ranges() == (IdRange(0, 5, 5, 0, "vocab"), IdRange(0, 3, 3, 0, "vocab"))
    new = TensorSpec.from_json(TensorSpec("x", "int32", ("batch",), "item", ids=(IdRange(1, None, 8),)).to_json())
    assert new.id_ranges() == (IdRange(1, None, 8),) and "vocab" not in new.to_json()

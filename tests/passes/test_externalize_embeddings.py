"""externalize-embeddings: structure (rows inputs with the id input's role, shared tables, pooled
bags, index_select), numbers (the stage runtime with the store's rows vs the graph with its tables),
refusals with their reasons, and composition with split-user-item. Purity: tests/passes/test_purity.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixexport.bundle import Bundle
from mixexport.errors import PreconditionError
from mixexport.passes import externalize_embeddings as ext
from mixexport.passes import split_user_item
from mixexport.pipeline import initial_bundle, run_pass, stage_runtime
from mixexport.source import load_source
from tests.conftest import make_checkpoint

NAMES = ("user_id", "item_id", "item_dense", "seq_hist")


class Shop(torch.nn.Module):
    """A user's model with every lookup shape the pass handles, and one it refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.user_emb = torch.nn.Embedding(30, 8)
        self.item_emb = torch.nn.Embedding(40, 8)      # shared: item_id and the sequence
        self.hashed = torch.nn.Embedding(7, 8)         # read at item_id % 7: refused
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8 * 4 + 4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, user_id, item_id, item_dense, seq_hist):
        bag = self.item_emb(seq_hist).mean(1)                         # pooled bag [B,S,8] -> [B,8]
        user = torch.index_select(self.user_emb.weight, 0, user_id)   # index_select on the weight
        return self.mlp(torch.cat([user, self.item_emb(item_id), item_dense, bag, self.hashed(item_id % 7)], 1))


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    torch.manual_seed(0)
    model = Shop().eval()

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, user_id, item_id, item_dense, seq_hist):
            return self.m(user_id, item_id, item_dense, seq_hist)

    args = (torch.randint(0, 30, (4,)), torch.randint(0, 40, (4,)), torch.randn(4, 4), torch.randint(0, 40, (4, 6)))
    batch = torch.export.Dim("batch")
    ep = torch.export.export(Named(), args, dynamic_shapes={n: {0: batch} for n in NAMES})
    path = tmp_path_factory.mktemp("shop") / "shop.pt2"
    torch.export.save(ep, path)
    return initial_bundle(load_source(path))


def _scores(bundle: Bundle, seed: int = 5) -> np.ndarray:
    with stage_runtime(bundle) as rt:
        return next(iter(rt.score(bundle.source.example_request(3, 11, seed=seed)).values()))


def test_lookups_become_rows_inputs_with_the_id_roles(shop: Bundle) -> None:
    result = run_pass(ext.PASS, shop, ext.Options(min_bytes=0), [])
    seg = result.bundle.segments[0]
    specs = {s.name: s for s in seg.inputs}
    assert {n: (s.role, s.shape) for n, s in specs.items() if "__" in n} == {
        "user_id__inner_m_user_emb": ("user", ("batch", 8)),
        "item_id__inner_m_item_emb": ("item", ("batch", 8)),
        "seq_hist__inner_m_item_emb": ("sequence", ("batch", 6, 8))}
    tables = {t.entry.name: t.entry for t in result.bundle.tables}
    assert sorted(tables) == ["inner_m_item_emb", "inner_m_user_emb"]  # one table, two uses: the shared one
    assert sorted(u.input for u in tables["inner_m_item_emb"].uses) == ["item_id", "seq_hist"]
    assert result.report["refused"] == {"inner_m_hashed": "its row index is computed in the graph at remainder "
                                                          "(aten.remainder.Scalar), not read from an id input"}
    assert "inner.m.item_emb.weight" not in seg.program.state_dict and "inner.m.hashed.weight" in seg.program.state_dict
    assert result.report["check_max_abs_diff"] == 0.0


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 2e-3), ("int8", 3e-2)])
def test_stage_scores_match_the_graph_with_its_tables(shop: Bundle, dtype: str, tol: float) -> None:
    out = run_pass(ext.PASS, shop, ext.Options(min_bytes=0, dtype=dtype, partitions=3), []).bundle
    want, got = _scores(shop), _scores(out)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= tol, rel
    assert all(t.entry.dtype == dtype and t.entry.partitions == 3 for t in out.tables)


@pytest.mark.parametrize("options,expect", [
    ({"tables": ("inner_m_hashed",)},
     r"cannot take out table 'inner_m_hashed': its row index is computed in the graph at remainder"),
    ({"tables": ("nope",)},
     r"no table named \['nope'\]; the lookups read \['inner_m_hashed', 'inner_m_item_emb', 'inner_m_user_emb'\]"),
    ({}, "no table of at least 67,108,864 bytes can go out"),
])
def test_refusals_say_why(shop: Bundle, options: dict, expect: str) -> None:
    with pytest.raises(PreconditionError, match=expect):
        run_pass(ext.PASS, shop, ext.Options(**options), [])


def test_parameter_names_select_tables_too(shop: Bundle) -> None:
    out = run_pass(ext.PASS, shop, ext.Options(tables=("inner.m.user_emb.weight",)), []).bundle
    assert [t.entry.name for t in out.tables] == ["inner_m_user_emb"]


def test_after_split_user_lookups_stay_in_the_user_segment(tmp_path: Path) -> None:
    bundle = initial_bundle(load_source(make_checkpoint(tmp_path / "ugsep.pt", "ugsep")))
    split = run_pass(split_user_item.PASS, bundle, split_user_item.Options(), []).bundle
    out = run_pass(ext.PASS, split, ext.Options(min_bytes=0), ["split-user-item"])
    user, item = out.bundle.segments
    assert {"user_cat__embed_user_table", "seq_items__embed_seq_table"} <= {s.name for s in user.inputs}
    assert "item_cat__embed_item_table" in {s.name for s in item.inputs}
    assert out.report["check_max_abs_diff"] == 0.0

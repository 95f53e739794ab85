"""A user's own model saved with torch.export.save: roles from name prefixes or --roles, safe
loading, and the same build/verify path as reference families."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from mixexport.errors import BadInputError
from mixexport.source import load_source
from tests.cli_helpers import run_cli


class UserModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user_emb = torch.nn.Embedding(30, 8)
        self.item_emb = torch.nn.Embedding(40, 8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8 * 3 + 4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, user_id, item_id, item_dense, seq_hist):
        seq = self.item_emb(seq_hist).mean(1)
        return self.mlp(torch.cat([self.user_emb(user_id), self.item_emb(item_id), item_dense, seq], 1))


def save_program(path: Path, names=("user_id", "item_id", "item_dense", "seq_hist"), dynamic: bool = True) -> Path:
    torch.manual_seed(0)
    model = UserModel().eval()
    args = (torch.randint(0, 30, (4,)), torch.randint(0, 40, (4,)), torch.randn(4, 4), torch.randint(0, 40, (4, 6)))

    class Renamed(torch.nn.Module):  # forward() argument names become the program's input names
        def __init__(self) -> None:
            super().__init__()
            self.m = model

    code = f"def forward(self, {', '.join(names)}):\n    return self.m({', '.join(names)})\n"
    ns: dict = {}
    exec(code, ns)
    Renamed.forward = ns["forward"]
    b = torch.export.Dim("batch")
    dyn = {n: {0: b} for n in names} if dynamic else None
    ep = torch.export.export(Renamed(), args, dynamic_shapes=dyn)
    torch.export.save(ep, path)
    return path


def test_pt2_with_role_prefixes_builds_and_verifies(tmp_path: Path) -> None:
    pt2 = save_program(tmp_path / "mine.pt2", names=("user_id", "item_id", "item_dense", "seq_hist"))
    source = load_source(pt2)
    roles = {s.name: s.role for s in source.inputs}
    assert roles == {"user_id": "user", "item_id": "item", "item_dense": "item", "seq_hist": "sequence"}
    assert {s.name: s.vocab for s in source.inputs if s.vocab} == {"user_id": 30, "item_id": 40, "seq_hist": 40}
    r = run_cli("build", str(pt2), "--out", str(tmp_path / "b"), "--no-bench")
    assert r.code == 0, r.err
    assert "metrics skipped: no labelled data" in r.out
    r = run_cli("verify", str(tmp_path / "b"))
    assert r.code == 0, r.err


def test_pt2_without_roles_is_refused_until_given(tmp_path: Path) -> None:
    pt2 = save_program(tmp_path / "anon.pt2", names=("uid", "item_id", "item_dense", "seq_hist"))
    with pytest.raises(BadInputError) as e:
        load_source(pt2)
    assert "inputs ['uid'] have no role" in e.value.message and "--roles" in e.value.hint
    r = run_cli("build", str(pt2), "--out", str(tmp_path / "b"), "--no-bench", "--roles", "uid=user")
    assert r.code == 0, r.err
    r = run_cli("build", str(pt2), "--out", str(tmp_path / "c"), "--roles", "uid=boss")
    assert r.code == 2 and "roles must be one of" in r.err and not (tmp_path / "c").exists()


def test_pt2_with_static_batch_is_refused(tmp_path: Path) -> None:
    pt2 = save_program(tmp_path / "static.pt2", dynamic=False)
    with pytest.raises(BadInputError, match="batch axis is static"):
        load_source(pt2)


MARKER = Path("/tmp/mixexport-test-pt2-marker")


class Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


def test_pt2_carrying_code_is_refused_before_torch_loads_it(tmp_path: Path) -> None:
    good = save_program(tmp_path / "good.pt2")
    bad = tmp_path / "bad.pt2"
    payload = io.BytesIO()
    torch.save({"x": Evil()}, payload)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = payload.getvalue() if "sample_inputs" in item.filename else zin.read(item)
            zout.writestr(item, data)
    MARKER.unlink(missing_ok=True)
    with pytest.raises(BadInputError) as e:
        load_source(bad)
    assert "refused to load" in e.value.message and "posix.system" in e.value.message
    assert not MARKER.exists()
    r = run_cli("inspect", str(bad))
    assert r.code == 2 and "refused to load" in r.err and not MARKER.exists()

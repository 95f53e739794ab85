"""Hostile checkpoints: a corrupt storage size and a weight dtype the family does not declare are
one-line errors (exit 2), never a traceback and never a silent cast."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
import torch

from mixexport.errors import BadInputError
from mixexport.models import create_model, load_checkpoint, save_checkpoint
from tests.cli_helpers import run_cli


def _good(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(create_model("rankmixer").eval(), tmp_path / "good.pt")


def _with_storage_size(src: Path, dst: Path, encoded: bytes) -> Path:
    """``src`` with the element count of its first storage replaced by the pickle opcode(s)
    ``encoded`` (torch.save writes it right after the storage's device string)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                pattern = re.compile(rb"(X\x03\x00\x00\x00cpuq.)(K.|M..|J....)", re.S)
                data, n = pattern.subn(lambda m: m.group(1) + encoded, data, count=1)
                assert n == 1
            zout.writestr(item, data)
    return dst


@pytest.mark.parametrize("encoded", [
    b"J\xfd\xff\xff\xff",                                   # BININT -3
    b"J\xff\xff\xff\xff",                                   # BININT -1
    b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80",            # LONG1 -2**63
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",            # LONG1 2**63-1: a size no record has
    b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01",        # LONG1 2**64: overflows int64
])
def test_corrupt_storage_size_is_one_line(tmp_path: Path, encoded: bytes) -> None:
    bad = _with_storage_size(_good(tmp_path), tmp_path / "bad.pt", encoded)
    with pytest.raises(BadInputError, match="not a readable torch checkpoint"):
        load_checkpoint(bad)
    r = run_cli("inspect", str(bad))
    assert r.code == 2 and r.err.startswith("error: ") and "Traceback" not in r.err


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.complex64, torch.int32, torch.bool])
def test_undeclared_weight_dtype_is_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    model = create_model("rankmixer").eval()
    path = save_checkpoint(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.dtype == torch.float32)
    payload["state_dict"][name] = payload["state_dict"][name].to(dtype)
    torch.save(payload, path)
    with pytest.raises(BadInputError) as e:
        load_checkpoint(path)
    assert f"weight {name!r} has dtype {str(dtype).replace('torch.', '')}" in e.value.message
    assert "declares float32" in e.value.message and "casts only losslessly" in e.value.message
    r = run_cli("inspect", str(path))
    assert r.code == 2 and "Traceback" not in r.err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lossless_widening_is_loaded_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    model = create_model("rankmixer").eval()
    path = save_checkpoint(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    narrow = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in payload["state_dict"].items()}
    payload["state_dict"] = narrow
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.write_bytes(buf.getvalue())
    loaded = load_checkpoint(path).model.state_dict()
    for k, v in narrow.items():
        assert loaded[k].dtype == model.state_dict()[k].dtype
        assert torch.equal(loaded[k], v.to(loaded[k].dtype))  # every value kept

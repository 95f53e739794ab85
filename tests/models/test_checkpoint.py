"""Checkpoints: round trip, and every broken or hostile file gives one clear error and runs nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mixexport.errors import BadInputError
from mixexport.models import CHECKPOINT_FORMAT, create_model, load_checkpoint, rankmixer, save_checkpoint
from tests.conftest import make_checkpoint


def test_round_trip(tmp_path: Path) -> None:
    model = create_model("rankmixer").eval()
    path = save_checkpoint(model, tmp_path / "m.pt", {"note": "x"})
    ck = load_checkpoint(path)
    assert ck.family == "rankmixer" and ck.metadata == {"note": "x"}
    feeds = {k: torch.from_numpy(v) for k, v in model.example_inputs(4).items()}
    with torch.no_grad():
        assert torch.equal(ck.model(**feeds), model(**feeds))


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/mixexport-test-evil-marker")


def write_payload(path: Path, payload: object) -> Path:
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "garbage", "code", "not_dict", "format",
                                  "family", "keys", "config", "state_keys", "shape"])
def test_bad_checkpoints_are_refused_with_one_line(case: str, tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path / "good.pt")
    payload = torch.load(good, weights_only=True)
    path = tmp_path / f"{case}.pt"
    expect = {
        "missing": "does not exist", "empty": "empty", "truncated": "not a readable", "garbage": "not a readable",
        "code": "refused to load", "not_dict": "expected a checkpoint dict", "format": "expected checkpoint format",
        "family": "unknown model family", "keys": "missing keys", "config": "invalid rankmixer config",
        "state_keys": "state_dict keys do not match", "shape": "has shape",
    }[case]
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "garbage":
        path.write_bytes(os.urandom(1000))
    elif case == "code":
        MARKER.unlink(missing_ok=True)
        write_payload(path, {"format": CHECKPOINT_FORMAT, "x": Evil()})
    elif case == "not_dict":
        write_payload(path, [1, 2, 3])
    elif case == "format":
        write_payload(path, {**payload, "format": "other/9"})
    elif case == "family":
        write_payload(path, {**payload, "family": "nosuch"})
    elif case == "keys":
        write_payload(path, {k: v for k, v in payload.items() if k != "state_dict"})
    elif case == "config":
        write_payload(path, {**payload, "config": {**payload["config"], "tokens": 7}})
    elif case == "state_keys":
        state = dict(payload["state_dict"])
        state.pop(next(iter(state)))
        write_payload(path, {**payload, "state_dict": state})
    elif case == "shape":
        state = dict(payload["state_dict"])
        key = "blocks.0.ffn.fc1.weight"
        state[key] = torch.zeros(1, 2, 3)
        write_payload(path, {**payload, "state_dict": state})
    with pytest.raises(BadInputError) as e:
        load_checkpoint(path)
    msg = e.value.message
    assert expect in msg and "\n" not in msg
    if case == "shape":
        assert "blocks.0.ffn.fc1.weight" in msg and "(1, 2, 3)" in msg
    if case == "code":
        assert not MARKER.exists()


def test_config_round_trips_through_dict() -> None:
    from mixexport.models.common import config_from_dict, config_to_dict

    cfg = rankmixer.base()
    assert config_from_dict(rankmixer.Config, config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        config_from_dict(rankmixer.Config, {"nope": 1})
    with pytest.raises(ValueError, match="expected int"):
        config_from_dict(rankmixer.Config, {"tokens": "8"})

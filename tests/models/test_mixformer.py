"""MixFormer reference (eager, no export): shapes and roles, the one-way head mask of UI-MixFormer
(user heads never see items; plain MixFormer's do), the masked mixing algebra, config validation
and a training step. Export, the split and parity: tests/passes/test_split_mixformer.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mixexport.models import FAMILIES, mixformer
from mixexport.models.common import token_mix
from tests.conftest import assert_training_reduces_loss


def _feeds(model: mixformer.Model, rows: int, seed: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in model.example_inputs(rows, seed).items()}


def _head_states(model: mixformer.Model, feeds: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """The head groups after every block (forward hooks on the blocks)."""
    states: list[list[torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: states.append([x.detach() for x in out[0]]))
             for b in model.blocks]
    with torch.inference_mode():
        model(**feeds)
    for h in hooks:
        h.remove()
    return states


def test_registered_with_shapes_roles_and_default_pass() -> None:
    assert FAMILIES["mixformer"] is mixformer and mixformer.DEFAULT_PASSES == ("split-user-item",)
    model = mixformer.Model(mixformer.tiny()).eval()
    with torch.inference_mode():
        assert model(**_feeds(model, 6, 0)).shape == (6, 1)
    roles = {s.name: s.role for s in model.input_specs()}
    assert roles == {"user_cat": "user", "item_cat": "item", "item_dense": "item", "seq_items": "sequence"}


def test_ui_user_heads_never_receive_item_information() -> None:
    """Changing only the item inputs leaves every user head of every block bit-identical and
    changes every item head; in plain MixFormer (ui=False) every head changes."""
    torch.manual_seed(0)
    model = mixformer.Model(dataclasses.replace(mixformer.tiny(), layers=3)).eval()
    feeds = _feeds(model, 4, 1)
    other = {**feeds, "item_cat": _feeds(model, 4, 2)["item_cat"], "item_dense": _feeds(model, 4, 3)["item_dense"]}
    for (u1, g1), (u2, g2) in zip(_head_states(model, feeds), _head_states(model, other)):
        assert torch.equal(u1, u2)
        assert all(not torch.allclose(a, b) for a, b in zip(g1, g2))  # every item head sees the item
    plain = mixformer.Model(dataclasses.replace(mixformer.tiny(), ui=False)).eval()
    (x1,), (x2,) = _head_states(plain, feeds)[0], _head_states(plain, other)[0]
    assert all(not torch.allclose(a, b) for a, b in zip(x1, x2))


def test_masked_head_mix_is_head_mixing_with_the_item_slices_of_user_heads_zeroed() -> None:
    hu, hi, b, d = 3, 2, 4, 10
    u, g = torch.randn(hu, b, d), torch.randn(hi, b, d)
    mix_u, mix_g = mixformer.masked_head_mix(u, g)
    full = token_mix(torch.cat([u, g]), hu + hi)                    # [H,B,D], slices of width D/H
    assert torch.equal(mix_g, full[hu:])                            # item heads: every slice
    assert torch.equal(mix_u[..., :hu * d // 5], full[:hu, :, :hu * d // 5])   # user heads: user slices
    assert not mix_u[..., hu * d // 5:].any()                       # … and zeros for the item slices


@pytest.mark.parametrize("kwargs,match", [
    ({"dim": 30}, "divisible by heads"),
    ({"user_heads": 4}, "1 <= user_heads < heads"),
    ({"user_heads": 0}, "1 <= user_heads < heads"),
    ({"layers": 0}, ">= 1"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixformer.Config(**kwargs)
    mixformer.Config(ui=False, user_heads=0)   # the head split only constrains UI-MixFormer


def test_all_padding_history_stays_finite_and_training_reduces_loss() -> None:
    torch.manual_seed(0)
    model = mixformer.Model(mixformer.tiny())
    feeds = _feeds(model, 16, 5)
    feeds["seq_items"][:4] = 0                                        # users without history
    with torch.inference_mode():
        assert bool(torch.isfinite(model.eval()(**feeds)).all())
    assert_training_reduces_loss(model, feeds)

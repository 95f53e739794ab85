"""TokenMixer-Large reference: tokenization (groups + global token), mixing with H != T and
reverting, the block equations, inter-layer residuals, training-only auxiliary heads, the
Sparse-Pertoken MoE (top-(k-1) softmax, shared expert, α, hidden split), training, and export."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mixexport.models import FAMILIES, tokenmixer_large as tml
from mixexport.models.common import token_mix, token_revert
from tests.conftest import assert_training_reduces_loss


def _model(seed: int = 0, **changes: object) -> tml.Model:
    torch.manual_seed(seed)
    return tml.Model(dataclasses.replace(tml.tiny(), **changes))


def _feeds(model: tml.Model, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in model.example_inputs(rows, seed).items()}


def _block_params(model: tml.Model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks") and "router" not in n)


def test_registered_shapes_tokens_and_parameter_count() -> None:
    assert FAMILIES["tokenmixer-large"] is tml and tml.DEFAULT_PASSES == ("pack-moe-experts",)
    model = _model().eval()
    feeds = _feeds(model, 6)
    assert model(**feeds).shape == (6, 1)
    x = model.tokenize(**feeds)
    assert x.shape == (8, 6, 64)                             # T-1 = 7 group tokens + the global token
    with torch.no_grad():
        torch.testing.assert_close(x[0], model.global_mlp(torch.cat(
            [model.embed.user(feeds["user_cat"], feeds["seq_items"]),
             model.embed.item(feeds["item_cat"], feeds["item_dense"])], 1)))
    # spec §11.6: ~2.4 M block parameters; "first enlarge, then sparse" keeps the dense total
    dense = _model(moe=False)
    assert _block_params(model) == _block_params(dense) and 2.3e6 < _block_params(model) < 2.5e6
    assert not any(p.bias is not None for n, p in model.named_modules() if n.startswith("blocks")
                   and hasattr(p, "bias") and not isinstance(p, torch.nn.RMSNorm))


def test_block_follows_the_equations_with_h_different_from_t() -> None:
    block = _model(moe=False).blocks[0].eval()
    assert block.heads == 4 and block.tokens == 8           # W = T·D/H = 128
    x = torch.randn(8, 3, 64)
    with torch.no_grad():
        hm = token_mix(x, 4)
        assert hm.shape == (4, 3, 128)
        hn = hm + block.f1(block.norm1(hm))
        want = x + block.f2(block.norm2(token_revert(hn, 8)))
        torch.testing.assert_close(block(x), want)
        block.f1.down.weight.zero_()                         # F1 = 0: Revert(Mix(X)) = X exactly
        torch.testing.assert_close(block(x), x + block.f2(block.norm2(x)))
    assert block.f1.gate.weight.shape == (4, 128, 256) and block.f2.gate.weight.shape == (8, 64, 128)


def test_sparse_pertoken_moe_math() -> None:
    for top_k in (2, 3):
        moe = _model(top_k=top_k, down_init=1.0).blocks[1].f2.eval()
        assert len(moe.experts) == 3 and moe.shared.gate.weight.shape == (8, 64, 32)   # nD/E = 128/4
        x = torch.randn(8, 5, 64)
        with torch.no_grad():
            gates = moe.gates(x)                             # [T,B,E-1]
            assert ((gates > 0).sum(-1) == top_k - 1).all()  # exactly k-1 routed experts per token
            torch.testing.assert_close(gates.sum(-1), torch.full((8, 5), 2.0))   # α · (softmax sums to 1)
            logits = x @ moe.router.weight
            top, idx = logits.topk(top_k - 1, dim=-1)
            want = moe.shared(x).clone()
            for t in range(8):
                for b in range(5):
                    p = top[t, b].softmax(-1)
                    for i in range(top_k - 1):
                        e = moe.experts[int(idx[t, b, i])]
                        h = F.silu(x[t, b] @ e.gate.weight[t]) * (x[t, b] @ e.up.weight[t])
                        want[t, b] += 2.0 * p[i] * (h @ e.down.weight[t])
            torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5)


def test_inter_layer_residuals_and_aux_heads_are_training_only() -> None:
    model = _model(layers=6).eval()
    assert model.residual_sources() == {2: 0, 4: 2}         # every 2 blocks, never into the last one
    feeds = _feeds(model, 4)
    with torch.no_grad():
        x = model.tokenize(**feeds)
        outs = []
        for i, block in enumerate(model.blocks):
            x = block(x) + (outs[i - 2] if i in (2, 4) else 0)
            outs.append(x)
        torch.testing.assert_close(model(**feeds), model.head(x.mean(0)))
    model.train()
    model.training_loss(feeds, torch.ones(4)).backward()
    assert model.aux_head.towers[0][0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():                                    # the eval output ignores the aux head
        before = model.eval()(**feeds)
        model.aux_head.towers[0][2].bias.add_(5.0)
        assert torch.equal(model(**feeds), before)


def test_exported_eval_graph_has_no_aux_head_and_no_data_dependent_ops() -> None:
    model = _model().eval()
    feeds = _feeds(model, 5)
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, (), kwargs=feeds, dynamic_shapes={k: {0: batch} for k in feeds}, strict=False)
    params = ep.graph_signature.inputs_to_parameters
    used = {params[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in params and n.users}
    assert used and not {p for p in used if p.startswith("aux_head")}
    assert {p for p in params.values() if p.startswith("aux_head")}   # present, but nothing reads them
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.topk.default" in ops and not {o for o in ops if "nonzero" in o or "cond" in o}
    assert len(ep.graph_signature.user_outputs) == 1
    other = _feeds(model, 11, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**other), model(**other))


@pytest.mark.parametrize("moe", [True, False])
def test_a_few_training_steps_reduce_the_loss(moe: bool) -> None:
    model = _model(moe=moe)
    assert_training_reduces_loss(model, _feeds(model, 128, seed=5))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible by heads"):
        tml.Config(heads=3)
    with pytest.raises(ValueError, match="top_k"):
        tml.Config(top_k=1)
    with pytest.raises(ValueError, match="divisible by experts"):
        tml.Config(experts=3)
    assert tml.Config(moe=False, experts=3).experts == 3     # MoE fields are ignored when dense

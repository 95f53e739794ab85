"""RankMixer Sparse-MoE reference: shapes, ReLU routing math, DTSI (h_infer only in eval, the L1 and
distillation terms in training, adaptive λ), gate sparsity, training, and a dynamic-batch export."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mixexport.models import FAMILIES, rankmixer, rankmixer_moe
from mixexport.models.common import token_mix
from tests.conftest import assert_training_reduces_loss


def _model(seed: int = 0, **changes: object) -> rankmixer_moe.Model:
    torch.manual_seed(seed)
    return rankmixer_moe.Model(dataclasses.replace(rankmixer_moe.tiny(), **changes))


def _feeds(model: rankmixer_moe.Model, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in model.example_inputs(rows, seed).items()}


def test_registered_shapes_and_parameter_count() -> None:
    assert FAMILIES["rankmixer-moe"] is rankmixer_moe
    assert rankmixer_moe.DEFAULT_PASSES == ("pack-moe-experts",)
    model = _model().eval()
    assert model(**_feeds(model, 6)).shape == (6, 1)
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks"))
    dense = sum(p.numel() for n, p in rankmixer.Model(rankmixer.tiny()).named_parameters() if n.startswith("blocks"))
    # E full-size experts per token (spec §11.6: ~2.1 M for the tiny config) plus two routers
    assert blocks == pytest.approx(4 * dense, rel=0.01) and 2.0e6 < blocks < 2.2e6


def test_eval_moe_is_relu_gated_sum_of_per_token_experts() -> None:
    moe = _model().blocks[0].ffn.eval()
    s = torch.randn(8, 3, 64)
    with torch.no_grad():
        got = moe(s)
        want = torch.zeros_like(s)
        for t in range(8):                       # explicit per token, per expert: spec §1.4
            g = F.relu(s[t] @ moe.router_infer.weight[t] + moe.router_infer.bias[t])       # [B,E]
            for j, expert in enumerate(moe.experts):
                h = F.gelu(s[t] @ expert.fc1.weight[t] + expert.fc1.bias[t])
                want[t] += g[:, j:j + 1] * (h @ expert.fc2.weight[t] + expert.fc2.bias[t])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eval_uses_only_the_inference_router() -> None:
    model = _model().eval()
    feeds = _feeds(model, 5)
    with torch.no_grad():
        before = model(**feeds)
        for block in model.blocks:
            block.ffn.router_train.weight.add_(1.0)
        assert torch.equal(model(**feeds), before)          # h_train plays no part in eval
        moe = model.blocks[0].ffn
        moe.router_infer.weight.zero_()
        moe.router_infer.bias.fill_(-1.0)                    # every h_infer gate is ReLU(-1) = 0
        assert torch.equal(moe(torch.randn(8, 4, 64)), torch.zeros(8, 4, 64))


def test_training_forward_routes_with_h_train() -> None:
    model = _model().train()
    moe = model.blocks[0].ffn
    s = torch.randn(8, 4, 64)
    with torch.no_grad():
        dense = moe(s)
        moe.router_infer.weight.add_(1.0)
        moe.router_infer.bias.add_(0.5)
        assert torch.equal(moe(s), dense)                    # h_infer does not change the train output
        moe.router_train.bias.add_(0.5)
        assert not torch.allclose(moe(s), dense)             # h_train does


def test_distillation_trains_only_the_inference_router() -> None:
    model = _model().train()
    moe = model.blocks[0].ffn
    moe(torch.randn(8, 4, 64))
    assert moe.stats is not None and float(moe.stats.distill.detach()) > 0
    moe.stats.distill.backward()
    assert moe.router_infer.weight.grad is not None and moe.router_infer.weight.grad.abs().sum() > 0
    for p in [*moe.experts.parameters(), *moe.router_train.parameters()]:
        assert p.grad is None                                # experts and h_train learn from the task only


def test_training_loss_adds_l1_and_distill_and_adapts_lambda() -> None:
    model = _model(l1_weight=0.5, active_budget=0.1, l1_adapt=2.0).train()
    feeds, label = _feeds(model, 16), torch.ones(16)
    loss = model.training_loss(feeds, label)
    bce = F.binary_cross_entropy_with_logits(model(**feeds)[:, 0], label)   # same (deterministic) forward
    stats = [moe.stats for moe in model.moe_layers()]
    l1 = torch.stack([s.l1 for s in stats]).mean()
    distill = torch.stack([s.distill for s in stats]).sum()
    torch.testing.assert_close(loss, bce + 0.5 * l1 + 1.0 * distill)
    assert float(torch.stack([s.active for s in stats]).mean()) > 0.1 and model.l1_lambda == 1.0
    relaxed = _model(l1_weight=0.5, active_budget=1.0, l1_adapt=2.0).train()
    relaxed.training_loss(feeds, label)
    assert relaxed.l1_lambda == 0.25                         # below budget: λ is relaxed
    with pytest.raises(RuntimeError, match="train mode"):
        model.eval().training_loss(feeds, label)


def _eval_gate_activity(model: rankmixer_moe.Model, feeds: dict[str, torch.Tensor]) -> float:
    """Fraction of non-zero h_infer gates over every MoE layer, on the eval forward's own inputs."""
    gates: list[torch.Tensor] = []
    hooks = [moe.register_forward_pre_hook(lambda m, args: gates.append(F.relu(m.router_infer(args[0]))))
             for moe in model.moe_layers()]
    with torch.no_grad():
        model.eval()(**feeds)
    for h in hooks:
        h.remove()
    return float(torch.cat([g.flatten() for g in gates]).gt(0).float().mean())


def test_dtsi_training_makes_inference_gates_exactly_zero_and_l1_adds_sparsity() -> None:
    activity = {}
    for l1 in (0.0, 2.0):                                    # fixed λ, same seed and data
        model = _model(l1_weight=l1, l1_adapt=1.0)
        feeds = _feeds(model, 64, seed=3)
        label = (torch.rand(64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
        start = _eval_gate_activity(model, feeds)
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        for _ in range(30):
            model.train()
            opt.zero_grad()
            model.training_loss(feeds, label).backward()
            opt.step()
        activity[l1] = _eval_gate_activity(model, feeds)
        assert start > 0.4 and activity[l1] < 0.3            # most eval gates are now exactly 0.0
    assert activity[2.0] < 0.85 * activity[0.0]              # the L1 term on h_infer adds sparsity


def test_a_few_training_steps_reduce_the_loss() -> None:
    model = _model()
    assert_training_reduces_loss(model, _feeds(model, 128, seed=5))


def test_block_reuses_rankmixer_post_norm_forward() -> None:
    block = _model().blocks[0].eval()
    assert isinstance(block, rankmixer.Block)
    x = torch.randn(8, 3, 64)
    with torch.no_grad():
        s = block.norm1(token_mix(x, 8) + x)
        torch.testing.assert_close(block(x), block.norm2(block.ffn(s) + s))


def test_eval_exports_with_a_dynamic_batch_and_no_data_dependent_ops() -> None:
    model = _model().eval()
    feeds = _feeds(model, 5)
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, (), kwargs=feeds, dynamic_shapes={k: {0: batch} for k in feeds}, strict=False)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not {o for o in ops if "nonzero" in o or "cond" in o or "while_loop" in o}
    matmuls = sum(str(n.target) == "aten.matmul.default" for n in ep.graph.nodes)
    assert matmuls == 1 + 2 * (1 + 2 * 4)                    # tokenizer + per block: h_infer + 2 per expert
    other = _feeds(model, 9, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**other), model(**other))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="experts"):
        rankmixer_moe.Config(experts=1)
    with pytest.raises(ValueError, match="divisible"):
        rankmixer_moe.Config(tokens=6)
    with pytest.raises(ValueError, match="active_budget"):
        rankmixer_moe.Config(active_budget=0.0)

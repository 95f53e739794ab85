"""RankMixer reference: shapes, the token-mixing algebra, and the ONNX lowering we promise
(per-token FFN as batched MatMul, never Einsum)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixexport.export import op_histogram, to_onnx
from mixexport.models import FeatureSchema, rankmixer
from mixexport.models.common import PerTokenLinear, token_mix, token_revert
from mixexport.source import EXAMPLE_BATCH


def test_forward_shapes_and_roles() -> None:
    model = rankmixer.Model(rankmixer.tiny()).eval()
    feeds = {k: torch.from_numpy(v) for k, v in model.example_inputs(6).items()}
    assert model(**feeds).shape == (6, 1)
    roles = {s.name: s.role for s in model.input_specs()}
    assert roles == {"user_cat": "user", "item_cat": "item", "item_dense": "item", "seq_items": "sequence"}


def test_token_mix_is_an_involution_with_h_equal_t_and_revert_inverts_any_h() -> None:
    x = torch.randn(8, 3, 64)
    assert torch.equal(token_mix(token_mix(x, 8), 8), x)
    for heads in (2, 4, 16):
        assert torch.equal(token_revert(token_mix(x, heads), 8), x)


def test_token_mix_matches_paper_definition() -> None:
    t, b, d, h = 4, 2, 8, 4
    x = torch.randn(t, b, d)
    mixed = token_mix(x, h)
    for head in range(h):  # mixed token h = concat over tokens of their h-th slice
        expect = torch.cat([x[tok, :, head * d // h:(head + 1) * d // h] for tok in range(t)], dim=-1)
        assert torch.equal(mixed[head], expect)


def test_per_token_linear_uses_each_tokens_own_weight() -> None:
    layer = PerTokenLinear(3, 4, 5)
    x = torch.randn(3, 2, 4)
    y = layer(x)
    for t in range(3):
        assert torch.allclose(y[t], x[t] @ layer.weight[t] + layer.bias[t], atol=1e-6)


def test_base_config_has_at_least_20m_parameters() -> None:
    model = rankmixer.Model(rankmixer.base(FeatureSchema()))
    assert sum(p.numel() for p in model.parameters()) >= 20_000_000


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        rankmixer.Config(tokens=6, dim=64)


def test_onnx_lowering_is_batched_matmul_without_einsum() -> None:
    model = rankmixer.Model(rankmixer.tiny()).eval()
    feeds = model.example_inputs(EXAMPLE_BATCH)
    ep = torch.export.export(model, (), kwargs={k: torch.from_numpy(v) for k, v in feeds.items()},
                             dynamic_shapes={k: {0: torch.export.Dim("batch")} for k in feeds})
    onnx_model = to_onnx(ep, model.input_specs(), model.output_specs(), feeds)
    ops = op_histogram(onnx_model)
    assert "Einsum" not in ops
    weights3d = {i.name for i in onnx_model.graph.initializer if len(i.dims) == 3}
    batched = [n for n in onnx_model.graph.node if n.op_type == "MatMul" and n.input[1] in weights3d]
    # tokenizer + 2 FFN matmuls per block, each reading a [T, in, out] initializer directly
    assert len(batched) == 1 + 2 * rankmixer.tiny().layers
    assert [d.dim_param for d in onnx_model.graph.input[0].type.tensor_type.shape.dim][0] == "batch"
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    other = model.example_inputs(9, seed=3)
    got = sess.run(None, other)[0]
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in other.items()}).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

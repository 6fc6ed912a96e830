"""The low-rank experts layer: the formula, gates, merge/unmerge, init schemes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.adapters import ExpertSpec, LowRankExperts
from rankwise.adapters.init import INIT_SCHEMES


def randomised(layer: LowRankExperts) -> LowRankExperts:
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return layer


def reference(layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """W x + b + sum_e g_e s_e B_e A_e x, written the slow and obvious way."""
    y = layer.base(x)
    for e, spec in enumerate(layer.experts):
        a, b = layer.expert_factors(e)
        y = y + gates[..., e : e + 1] * spec.scaling * (x @ (b @ a).T)
    return y


@pytest.fixture
def layer() -> LowRankExperts:
    torch.manual_seed(0)
    experts = [ExpertSpec(4, 8.0), ExpertSpec(2, 3.0, use_rslora=True), ExpertSpec(8, 16.0)]
    return randomised(LowRankExperts(nn.Linear(12, 10), experts))


def test_plain_sum_matches_formula(layer):
    x = torch.randn(5, 7, 12)
    torch.testing.assert_close(layer(x), reference(layer, x, torch.ones(3)))


def test_static_and_per_token_gates(layer):
    x = torch.randn(5, 7, 12)
    layer.expert_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(layer(x), reference(layer, x, layer.expert_weights))
    gates = torch.rand(5, 7, 3)
    torch.testing.assert_close(layer(x, gates=gates), reference(layer, x, gates))


def test_scalings():
    assert ExpertSpec(16, 32.0).scaling == 2.0
    assert ExpertSpec(16, 32.0, use_rslora=True).scaling == 8.0
    assert ExpertSpec(0, 1.0).scaling == 0.0


def test_merge_unmerge_restores_weight(layer):
    x = torch.randn(4, 12)
    before = layer.base.weight.clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (layer.base.weight - before).abs().max() < 1e-6
    with pytest.raises(RuntimeError):
        layer.unmerge()


def test_eval_never_changes_weights(layer):
    before = layer.base.weight.clone()
    layer.eval()
    layer.train()
    assert torch.equal(layer.base.weight, before) and not layer.merged


@pytest.mark.parametrize("scheme", sorted(INIT_SCHEMES))
def test_every_init_scheme_starts_as_identity(scheme):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LowRankExperts(base, [ExpertSpec(4, 8.0, init=scheme)])
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.lora_A.abs().sum() + layer.lora_B.abs().sum() > 0  # one factor is random


def test_dropout_runs_group_equal_rates():
    layer = LowRankExperts(
        nn.Linear(6, 6), [ExpertSpec(2, 1.0, dropout=0.1), ExpertSpec(3, 1.0, dropout=0.1)]
    )
    assert layer.run_slices == [slice(0, 5)]
    mixed = LowRankExperts(
        nn.Linear(6, 6), [ExpertSpec(2, 1.0, dropout=0.1), ExpertSpec(3, 1.0, dropout=0.0)]
    )
    assert mixed.run_slices == [slice(0, 2), slice(2, 5)]
    randomised(mixed).eval()  # dropout off: the grouped path still equals the formula
    x = torch.randn(2, 6)
    torch.testing.assert_close(mixed(x), reference(mixed, x, torch.ones(2)))


def test_only_adapter_parameters_train(layer):
    assert set(layer.adapter_params()) == {"lora_A", "lora_B"}
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


@pytest.mark.parametrize("ranks", [[3, 3, 3], [2, 4, 1]])
def test_expert_outputs_are_each_experts_product(ranks):
    layer = LowRankExperts(nn.Linear(8, 5), [ExpertSpec(r, 1.0) for r in ranks])
    nn.init.normal_(layer.lora_B)
    h = torch.randn(2, 4, sum(ranks))
    expected = [h[..., layer.expert_slice(e)] @ layer.expert_factors(e)[1].T for e in range(3)]
    torch.testing.assert_close(layer.expert_outputs(h), torch.stack(expected, dim=-2))


def test_bf16_base_runs_products_in_bf16_with_fp32_factors():
    layer = LowRankExperts(nn.Linear(8, 5).to(torch.bfloat16), [ExpertSpec(4, 8.0)])
    nn.init.normal_(layer.lora_B)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = layer.base(x).float() + 2.0 * (x.float() @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(y.float(), reference, atol=0.1, rtol=0.02)
    y.sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32

"""Adapter merging: identities, exactness of linear merging, and PEFT as the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel

from rankwise.adapters import LoraWeights, attach_adapters, write_adapter
from rankwise.merge import METHODS, merge_adapters

# Module name -> (out, in) of the tiny Llama in conftest (hidden 32, 2 of 4 heads for k/v).
SHAPES = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "down_proj": (32, 64)}
PREFIX = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}


def random_adapter(
    seed: int, rank: int = 4, kinds=("q_proj", "v_proj", "down_proj"), alpha: float = 8.0
) -> LoraWeights:
    """A LoRA adapter for the tiny Llama with random A and B (B non-zero, so it does something)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(2):
        for kind in kinds:
            out, fan_in = SHAPES[kind]
            a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            b = 0.2 * torch.randn(out, rank, generator=gen)
            factors[f"model.layers.{layer}.{PREFIX[kind]}.{kind}"] = (a, b)
    return LoraWeights(factors, {m: alpha for m in factors}, base_model="tiny")


def logits(adapters: list[LoraWeights], tokens: torch.Tensor) -> torch.Tensor:
    """The tiny Llama's logits with the adapters attached as experts (their updates summed)."""
    model = tiny_llama()
    attach_adapters(model, adapters)
    with torch.no_grad():
        return model(tokens).logits


def delta(weights: LoraWeights, module: str) -> torch.Tensor:
    return weights.delta(module) if module in weights.factors else 0.0


def flat_adapter(seed: int, rank: int = 4) -> LoraWeights:
    """A random adapter whose every update has a flat spectrum (orthonormal factors, scaled)."""
    weights = random_adapter(seed, rank)
    for module, (a, b) in weights.factors.items():
        weights.factors[module] = (torch.linalg.qr(a.T)[0].T, 0.3 * torch.linalg.qr(b)[0])
    return weights


def identity_grams(adapter: LoraWeights) -> list[dict[str, torch.Tensor]]:
    """Random positive-definite input Gram matrices for each module of one adapter."""
    gen = torch.Generator().manual_seed(0)
    grams = {}
    for module, (a, _) in adapter.factors.items():
        x = torch.randn(3 * a.shape[1], a.shape[1], generator=gen)
        grams[module] = x.T @ x / x.shape[0]
    return [grams]


IDENTITY = {"linear": {}, "ties": {"density": 1.0}, "dare_linear": {"density": 1.0},
            "dare_ties": {"density": 1.0}, "lego": {}, "tsv": {}, "iso_c": {}, "iso_cts": {},
            "knots_ties": {"density": 1.0}, "knots_dare_ties": {"density": 1.0},
            "regmean": {"grams": identity_grams}}  # fmt: skip
FLATTENING = {"iso_c", "iso_cts"}  # they flatten the spectrum: the identity of a flat adapter


def test_every_registered_method_has_an_identity_case():
    assert set(IDENTITY) == set(METHODS)


@pytest.mark.parametrize("method", IDENTITY)
def test_merging_one_adapter_with_weight_one_returns_it(method, tokens):
    adapter = flat_adapter(0) if method in FLATTENING else random_adapter(0)
    kwargs = {k: v(adapter) if callable(v) else v for k, v in IDENTITY[method].items()}
    merged, report = merge_adapters([adapter], method=method, weights=[1.0], **kwargs)
    assert (logits([merged], tokens) - logits([adapter], tokens)).abs().max() < 1e-5
    assert report.discarded < 1e-6  # zero up to float32 rounding


def test_linear_at_full_rank_is_the_sum_of_the_deltas(tokens):
    # Different ranks, alphas and module sets: k_proj only in b, down_proj only in a.
    a = random_adapter(1, rank=4)
    b = random_adapter(2, rank=2, kinds=("q_proj", "k_proj"), alpha=3.0)
    merged, report = merge_adapters([a, b], weights=[0.7, -1.3], rank=6)
    assert set(merged.factors) == set(a.factors) | set(b.factors)
    for module in merged.factors:
        expected = 0.7 * delta(a, module) - 1.3 * delta(b, module)
        assert torch.allclose(merged.delta(module), expected, atol=1e-6), module
    assert report.discarded < 1e-10
    assert merged.rank("model.layers.0.self_attn.q_proj") == 6  # 4 + 2 ranks, exactly
    assert merged.rank("model.layers.0.self_attn.k_proj") == 2  # only b has it
    both = logits([a, b], tokens)  # both attached as experts: their updates add up
    assert (logits([merge_adapters([a, b], rank=6).weights], tokens) - both).abs().max() < 1e-5


def test_truncated_linear_keeps_top_singular_values_and_reports_the_rest():
    a, b = random_adapter(3), random_adapter(4)
    merged, report = merge_adapters([a, b], rank=3)
    for module in merged.factors:
        dense = a.delta(module) + b.delta(module)
        u, s, vh = torch.linalg.svd(dense)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose(merged.delta(module), best, atol=1e-5), module
        dropped = float(s[3:].square().sum() / s.square().sum())
        assert report.module_discarded()[module] == pytest.approx(dropped, rel=1e-4)
    assert 0 < report.discarded < 1


def peft_merge(tmp_path, adapters, combination_type, **kwargs) -> PeftModel:
    """PEFT's add_weighted_adapter over the same adapters, weights 1, as the active adapter."""
    for i, adapter in enumerate(adapters):
        write_adapter(adapter, tmp_path / str(i))
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "0", adapter_name="0")
    for i in range(1, len(adapters)):
        model.load_adapter(tmp_path / str(i), adapter_name=str(i))
    names = [str(i) for i in range(len(adapters))]
    model.add_weighted_adapter(names, [1.0] * len(adapters), "merged", combination_type, **kwargs)
    model.set_adapter("merged")
    return model.eval()


@pytest.mark.parametrize("rank", [3, 6])
def test_linear_matches_peft_svd(tmp_path, tokens, rank):
    adapters = [random_adapter(5, rank=4), random_adapter(6, rank=2, kinds=("q_proj", "k_proj"))]
    peft_model = peft_merge(tmp_path, adapters, "svd", svd_rank=rank)
    with torch.no_grad():
        expected = peft_model(tokens).logits
    merged = merge_adapters(adapters, rank=rank).weights
    assert (logits([merged], tokens) - expected).abs().max() < 1e-5


def test_ties_matches_peft_ties_svd(tmp_path, tokens):
    adapters = [random_adapter(7), random_adapter(8), random_adapter(9)]
    peft_model = peft_merge(tmp_path, adapters, "ties_svd", svd_rank=5, density=0.3)
    with torch.no_grad():
        expected = peft_model(tokens).logits
    merged = merge_adapters(adapters, method="ties", rank=5, density=0.3).weights
    assert (logits([merged], tokens) - expected).abs().max() < 1e-5


def test_merged_adapter_loads_in_peft_with_the_same_logits(tmp_path, tokens):
    adapters = [random_adapter(10, rank=4), random_adapter(11, rank=2, kinds=("k_proj",))]
    merged = merge_adapters(adapters, method="lego", rank=3).weights
    write_adapter(merged, tmp_path / "m")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "m").eval()
    with torch.no_grad():
        assert (peft_model(tokens).logits - logits([merged], tokens)).abs().max() < 1e-5

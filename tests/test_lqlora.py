"""LQ-LoRA: the alternating decomposition, Fisher weighting, the ILP bit allocation, the verb."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from architectures import tiny_model
from conftest import tiny_llama

from rankwise.adapters import load_adapter
from rankwise.architectures import linear_shape
from rankwise.cli import main
from rankwise.errors import RankwiseError
from rankwise.models import load_model
from rankwise.quantize import NFkLinear, quantizable
from rankwise.quantize.allocation import allocate
from rankwise.quantize.lqlora import LQLoRA, decompose, empirical_fisher, squared_error
from rankwise.quantize.nfk import dequantize_weight, quantize_weight, storage_bits

pytestmark = pytest.mark.usefixtures("one_thread")


def structured_weight(seed: int = 0) -> torch.Tensor:
    """A [96, 128] weight as trained ones look: small noise plus a few strong directions."""
    g = torch.Generator().manual_seed(seed)
    spikes = torch.randn(96, 4, generator=g) @ torch.randn(4, 128, generator=g) / 80
    return 0.02 * torch.randn(96, 128, generator=g) + spikes


def plain_error(weight: torch.Tensor, bits: int, block: int) -> float:
    q = dequantize_weight(quantize_weight(weight, bits, block), bits, tuple(weight.shape))
    return squared_error(weight - q, None)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_falls_over_iterations_and_beats_plain_nfk(bits):
    weight = structured_weight(bits)
    found = decompose(weight, bits, 64, rank=8, iters=6)
    assert len(found.errors) > 1 and found.errors == sorted(found.errors, reverse=True)
    assert found.errors[-1] < found.errors[0]
    q = dequantize_weight(found.state, bits, (96, 128))
    assert squared_error(weight - q - found.b @ found.a, None) == pytest.approx(found.errors[-1])
    # equal bits as the paper compares: the same NF-k codes, and QLoRA's adapter of the same
    # rank costs what L1 L2 does
    assert found.errors[-1] < 0.5 * plain_error(weight, bits, 64)


def test_fisher_weighting_lowers_the_fisher_weighted_error():
    weight = structured_weight()
    g = torch.Generator().manual_seed(1)
    fisher = torch.exp(2 * torch.randn(96, 1, generator=g)) * torch.exp(
        2 * torch.randn(1, 128, generator=g)
    )  # a rank-1 Fisher: rows and columns of very different importance
    weighted = decompose(weight, 3, 64, rank=8, iters=5, fisher=fisher)
    plain = decompose(weight, 3, 64, rank=8, iters=5)
    q = dequantize_weight(plain.state, 3, (96, 128))
    plain_weighted = squared_error(weight - q - plain.b @ plain.a, fisher)
    assert weighted.errors[-1] < 0.5 * plain_weighted


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_empirical_fisher_is_mean_squared_gradients_per_weight(arch):
    model = tiny_model(arch)
    modules = quantizable(model)
    ids = torch.randint(3, 60, (3, 8), generator=torch.Generator().manual_seed(0))
    fisher = empirical_fisher(model, ids, modules)
    name = next(iter(modules))
    module = modules[name]
    expected = 0
    for row in ids:
        model.zero_grad()
        module.weight.requires_grad_(True)
        model(input_ids=row[None], labels=row[None]).loss.backward()
        grad = module.weight.grad.T if arch == "gpt2" else module.weight.grad  # Conv1D: [in, out]
        expected = expected + grad.square() / len(ids)
        module.weight.requires_grad_(False)
    assert torch.allclose(fisher[name], expected, rtol=1e-4, atol=1e-12)
    assert all(f.shape == linear_shape(modules[n])[::-1] for n, f in fisher.items())  # [out, in]
    assert not any(p.requires_grad for p in model.parameters())  # left as it was


def test_allocation_is_the_exact_optimum_within_the_budget():
    rng = np.random.default_rng(0)
    costs = rng.random((5, 3)) * np.array([4.0, 2.0, 1.0])  # more bits, less error
    storage = np.array([2.0, 3.0, 4.0]) * rng.integers(1, 4, (5, 1))
    budget = 0.5 * (storage.min(1).sum() + storage.max(1).sum())
    choice = allocate(costs, storage, budget)
    rows = np.arange(5)
    assert storage[rows, choice].sum() <= budget
    feasible = [
        costs[rows, list(c)].sum()
        for c in itertools.product(range(3), repeat=5)
        if storage[rows, list(c)].sum() <= budget
    ]
    assert costs[rows, choice].sum() == pytest.approx(min(feasible))
    with pytest.raises(RankwiseError, match="cheapest choice"):
        allocate(costs, storage, storage.min(1).sum() - 1)


def test_storage_bits_is_what_the_layer_stores():
    layer = NFkLinear.from_weight(torch.randn(48, 96), None, 3, 32)
    assert storage_bits(48, 96, 3, 32) == 8 * layer.storage_bytes()


def test_ilp_meets_the_budget_and_beats_uniform_bits_at_equal_budget():
    torch.manual_seed(0)
    reference = tiny_llama()
    with torch.no_grad():  # layers of unequal scale: their errors weigh unequally
        for i, layer in enumerate(quantizable(reference).values()):
            layer.weight *= 1 + 3 * (i % 3)
    modules = quantizable(reference)
    uniform = LQLoRA(bits=3, rank=2, iters=3)
    weights = sum(m.weight.numel() for m in modules.values())
    budget = sum(uniform.storage(m, 3, 32) for m in modules.values()) / weights
    mixed = LQLoRA(bits_budget=budget, bits_choices=[2, 3, 4], block_choices=[16, 32], rank=2,
                   iters=3)  # fmt: skip
    models, errors = {}, {}
    for label, method in (("uniform", uniform), ("mixed", mixed)):
        model = tiny_llama()
        model.load_state_dict(reference.state_dict())
        factors = method.quantize(model, 32)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, NFkLinear)}
        errors[label] = sum(
            squared_error(modules[n].weight - m.dequantized() - factors[n][1] @ factors[n][0]
                          * method.alpha / method.rank, None)
            for n, m in layers.items()
        )  # fmt: skip
        used = sum(method.storage(modules[n], m.bits, m.block) for n, m in layers.items())
        models[label] = {(m.bits, m.block) for m in layers.values()}
        assert used <= budget * weights
    assert len(models["mixed"]) > 1  # it mixed configurations
    assert errors["mixed"] < errors["uniform"]


def test_lq_lora_verb_writes_mixed_bits_and_its_adapter(model_dir, tmp_path):
    out = tmp_path / "lq"
    args = ["quantize", "--model", str(model_dir), "--method", "lq-lora", "--bits-budget", "4.5"]
    settings = ["--rank", "2", "--iters", "2", "--bits-choices", "2,3,4", "--block-choices", "32"]
    fisher = ["--fisher", "true", "--samples", "2", "--seq-len", "16"]
    assert main([*args, *settings, *fisher, "-o", str(out)]) == 0
    record = json.loads((out / "rankwise_quantization.json").read_text())
    assert record["method"] == "lq-lora" and record["settings"]["fisher"] is True
    layers = json.loads((out / "config.json").read_text())["layers"]
    assert {e["bits"] for e in layers.values()} <= {2, 3, 4}
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    dense = tiny_llama()(tokens).logits
    plain = load_model(str(model_dir), quantize="nf2", quant_block=32).model
    lq = load_model(str(out)).model
    load_adapter(lq, out / "adapter")
    with torch.no_grad():
        assert (lq(tokens).logits - dense).norm() < (plain(tokens).logits - dense).norm()


def test_lq_lora_refuses_bad_settings():
    with pytest.raises(RankwiseError, match="2, 3, 4 or 8"):
        LQLoRA(bits_choices=[5])
    with pytest.raises(RankwiseError, match="needs calibration data"):
        LQLoRA(fisher=True).quantize(tiny_llama(), 32)

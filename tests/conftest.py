"""Shared fixtures: tiny random Llama models built in code, and the real embedded model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for unit tests (fp32, eval mode, frozen)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def embedded():
    """The real SmolLM2-135M-Instruct (converted once into the rankwise cache)."""
    from rankwise.models import load_model

    return load_model()

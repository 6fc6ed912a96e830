"""Shared fixtures: tiny random Llama models built in code, and the real embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_llama(
    seed: int = 0, hidden: int = 32, layers: int = 2, init_range: float = 0.02
) -> LlamaForCausalLM:
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
        initializer_range=init_range,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def save_tiny_model(folder: Path, seed: int = 0, init_range: float = 0.02) -> Path:
    """Save ``tiny_llama(seed)`` with a word-level tokenizer ("w0".."w124") as an HF folder."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(125)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tiny_llama(seed, init_range=init_range).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny random Llama saved as a Hugging Face folder."""
    return save_tiny_model(tmp_path / "tiny")


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_thread():
    """Tiny models run many small ops: one thread avoids thread wake-ups (15x faster on 2 cores).

    Modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded():
    """The real SmolLM2-135M-Instruct (converted once into the rankwise cache)."""
    from rankwise.models import load_model

    return load_model()

"""The engine on every architecture of tests/architectures.py: greedy text equals ``generate``.

The engine passes its own masks, positions and cache, so it must reproduce what each model's
own forward does: sliding windows (Mistral on every layer, Gemma2 on alternating layers; the
prompts here run past their 8-token window), Gemma2's soft-capping, GPT-2's absolute positions
and Conv1D layers, fused projections (Phi-3, GPT-NeoX).
"""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, WINDOW, save_tiny_model, tiny_model, word_tokenizer
from test_serve_support import (
    greedy_text,
    random_adapter,
)

from rankwise import RankwiseError
from rankwise.adapters.attach import attach_adapters
from rankwise.adapters.peft_format import write_adapter
from rankwise.serve.engine import Engine, EngineConfig
from rankwise.serve.folder import AdapterFolder
from rankwise.serve.requests import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = word_tokenizer()
PROMPTS = [[1, 5, 6], [1, *range(10, 22)], [1, *range(30, 50)]]  # 3, 13 and 21 tokens
ADAPTERS = (None, 0, 1)  # the base model and two adapters on every linear layer


def adapters(arch: str) -> list:
    return [random_adapter(tiny_model(arch), seed, targets=None) for seed in (20, 21)]


def reference(arch: str, adapter: int | None, prompt: list[int], n: int) -> str:
    """Greedy text of ``generate`` with the adapter attached the ordinary way (EOS not special)."""
    model = tiny_model(arch)
    if adapter is not None:
        attach_adapters(model, [adapters(arch)[adapter]])
    return greedy_text(model, TOKENIZER, prompt, n)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_batch_equals_generate_with_the_adapter_attached(arch):
    engine = Engine(tiny_model(arch), TOKENIZER, EngineConfig(max_rank=4))
    for i, weights in enumerate(adapters(arch)):
        engine.register(f"a{i}", weights)
    jobs = [
        (p, a, 6 + 4 * (i % 3))
        for i, (p, a) in enumerate((p, a) for p in PROMPTS for a in ADAPTERS)
    ]  # lengths differ, so rows leave the batch at different steps
    requests = [
        GenerationRequest(p, None if a is None else f"a{a}", max_tokens=n, ignore_eos=True)
        for p, a, n in jobs
    ]
    together = engine.generate(requests)
    assert together == [reference(arch, a, p, n) for p, a, n in jobs]
    assert len(set(together)) > len(PROMPTS)  # the adapters really change the text
    assert max(len(p) + n for p, _, n in jobs) > 2 * WINDOW


def test_models_the_masks_cannot_express_are_refused_at_once():
    chunked = tiny_model("llama")
    chunked.config.attention_chunk_size = 4
    with pytest.raises(RankwiseError, match="chunked attention"):
        Engine(chunked, TOKENIZER)
    linear = tiny_model("qwen2")
    linear.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(RankwiseError, match="linear_attention layers"):
        Engine(linear, TOKENIZER)
    flex = tiny_model("llama")
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(RankwiseError, match="flex_attention implementation does not take"):
        Engine(flex, TOKENIZER)


def test_the_adapter_folder_serves_conv1d_adapters(tmp_path):
    """GPT-2 adapters are written with fan_in_fan_out: true; a misfit one is skipped."""
    root = tmp_path / "adapters"
    save_tiny_model("gpt2", tmp_path / "model")
    model = tiny_model("gpt2")
    write_adapter(random_adapter(model, 1, targets=("c_attn", "c_fc")), root / "fits")
    other = tiny_model("gpt2")
    other.transformer.h[0].attn.c_attn = torch.nn.Linear(32, 64)
    write_adapter(random_adapter(other, 2, targets=("c_attn",)), root / "misfit")
    assert '"fan_in_fan_out": true' in (root / "fits" / "adapter_config.json").read_text()
    engine = Engine(model, TOKENIZER, EngineConfig(max_rank=4))
    AdapterFolder(root, engine, "model").scan()
    assert set(engine.adapters) == {"fits"}
    prompt = PROMPTS[1]
    text = engine.generate([GenerationRequest(prompt, "fits", max_tokens=5, ignore_eos=True)])
    expected = tiny_model("gpt2")
    attach_adapters(expected, [random_adapter(tiny_model("gpt2"), 1, targets=("c_attn", "c_fc"))])
    assert text == [greedy_text(expected, TOKENIZER, prompt, 5)]

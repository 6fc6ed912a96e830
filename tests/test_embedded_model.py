"""Integration tests on the real embedded SmolLM2-135M-Instruct (marked ``model``)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from rankwise.adapters import LoraConfig, expert_layers, inject_adapter, save_adapter
from rankwise.errors import RankwiseError
from rankwise.evaluate.generation import Sampling, generate
from rankwise.models import gguf_to_folder, load_model

pytestmark = pytest.mark.model


def test_embedded_model_loads_from_cache(embedded):
    assert embedded.name == "SmolLM2-135M-Instruct"
    assert embedded.model.config.num_hidden_layers == 30
    assert not any(p.requires_grad for p in embedded.model.parameters())
    assert embedded.tokenizer.chat_template


def test_rankwise_adapter_matches_peft_on_the_real_model(embedded, tmp_path):
    model = copy.deepcopy(embedded.model)
    inject_adapter(model, LoraConfig(r=8, lora_alpha=16))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in expert_layers(model).values():
            layer.lora_B.normal_(std=1e-2)
    save_adapter(model, tmp_path / "a", base_model=embedded.name)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(embedded.model), tmp_path / "a").eval()
    tokens = embedded.tokenizer("The quick brown fox jumps", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(tokens).logits, peft_model(tokens).logits
        base = embedded.model(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - base).abs().max() > 1e-2


def test_greedy_generation_is_deterministic(embedded):
    sampling = Sampling(max_new_tokens=8)
    first = generate(embedded.model, embedded.tokenizer, "What is 2 + 2?", sampling)
    assert first and first == generate(
        embedded.model, embedded.tokenizer, "What is 2 + 2?", sampling
    )


def test_corrupt_gguf_is_one_sentence(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RankwiseError, match="could not read GGUF file"):
        gguf_to_folder(bad)
    with pytest.raises(RankwiseError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))

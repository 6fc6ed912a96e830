"""PEFT's adapter format, with PEFT itself as the numerical reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from rankwise import LoraConfig, RankwiseError, inject_adapter, load_adapter, save_adapter
from rankwise.adapters import expert_layers, merge_experts, remove_experts, unmerge_experts


def randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give B non-zero values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in expert_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=gen))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_rankwise_adapter_loads_in_peft_with_same_logits(tmp_path, tokens):
    model = tiny_llama()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3.0},
    )
    inject_adapter(model, config)
    randomise_adapters(model)
    ours = logits(model, tokens)
    save_adapter(model, tmp_path / "a", base_model="tiny")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert (logits(peft_model, tokens) - ours).abs().max() < 1e-5
    assert (ours - logits(tiny_llama(), tokens)).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "up_proj"],
            "rank_pattern": {"k_proj": 2, "layers.1.mlp.up_proj": 5},
            "alpha_pattern": {"up_proj": 4},
        },
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True},
    ],
    ids=["rank_pattern", "rslora"],
)
def test_peft_adapter_loads_in_rankwise_with_same_logits(tmp_path, tokens, peft_kwargs):
    torch.manual_seed(3)
    peft_model = get_peft_model(
        tiny_llama(), PeftLoraConfig(init_lora_weights=False, **peft_kwargs)
    )
    peft_model.eval()
    expected = logits(peft_model, tokens)
    peft_model.save_pretrained(tmp_path / "p")
    model = tiny_llama()
    load_adapter(model, tmp_path / "p")
    assert (logits(model, tokens) - expected).abs().max() < 1e-5


def test_merge_then_unmerge_restores_weights(tokens):
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8))
    randomise_adapters(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    unmerged = logits(model, tokens)
    merge_experts(model)
    assert (logits(model, tokens) - unmerged).abs().max() < 1e-5
    unmerge_experts(model)
    for name, value in model.state_dict().items():
        assert (value - before[name]).abs().max() < 1e-6, name
    remove_experts(model)
    assert not expert_layers(model)
    assert (logits(model, tokens) - logits(tiny_llama(), tokens)).abs().max() < 1e-6


def test_fresh_adapter_is_identity_and_counts_parameters(tokens):
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert torch.equal(logits(model, tokens), logits(tiny_llama(), tokens))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.q_proj.lora_{m}" for i in (0, 1) for m in "AB"
    }


def saved_adapter(tmp_path, hidden=32):
    model = tiny_llama(hidden=hidden)
    inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return save_adapter(model, tmp_path / f"h{hidden}", base_model=f"tiny-{hidden}")


def test_missing_folder_is_one_sentence(tmp_path):
    with pytest.raises(RankwiseError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nope")


def test_truncated_safetensors(tmp_path):
    folder = saved_adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(RankwiseError, match="truncated or corrupt"):
        load_adapter(tiny_llama(), folder)


def test_adapter_for_another_model_names_module_and_shapes(tmp_path):
    folder = saved_adapter(tmp_path, hidden=64)
    with pytest.raises(RankwiseError) as err:
        load_adapter(tiny_llama(hidden=32), folder)
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "[2, 64]" in message and "[2, 32]" in message and "tiny-64" in message


def test_unknown_target_lists_available():
    with pytest.raises(RankwiseError, match="available: q_proj, k_proj, v_proj, o_proj"):
        inject_adapter(tiny_llama(), LoraConfig(target_modules=["query_key_value"]))


def test_pickle_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(RankwiseError, match="never loads"):
        load_adapter(tiny_llama(), tmp_path)


def test_unsupported_peft_options_are_refused(tmp_path):
    folder = saved_adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(RankwiseError, match="use_dora"):
        load_adapter(tiny_llama(), folder)

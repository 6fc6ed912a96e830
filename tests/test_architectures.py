"""Every architecture users bring: LoRA on all linear layers trains, saves, loads, matches PEFT.

Tiny random models of eight families (tests/architectures.py): Llama, Qwen2, Qwen3, Mistral,
Gemma2, Phi-3, GPT-2 and GPT-NeoX. Serving and compression have their own architecture tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from architectures import ARCHITECTURES, tiny_model, train_tiny

from rankwise.adapters import (
    LoraConfig,
    expert_layers,
    inject_adapter,
    load_adapter,
    merge_experts,
    remove_experts,
    save_adapter,
    unmerge_experts,
)
from rankwise.architectures import block_index
from rankwise.data import collate
from rankwise.mixture import build_mixture
from rankwise.train.loss import summed_loss

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))


def adapted(arch: str, seed: int = 0) -> torch.nn.Module:
    """``tiny_model(arch)`` with a rank-4 LoRA on every linear layer, B random (not zero)."""
    model = tiny_model(arch)
    torch.manual_seed(seed)
    for layer in inject_adapter(model, LoraConfig(r=4, lora_alpha=8)).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_linear_lora_trains_saves_and_loads_back(arch, tmp_path):
    result, losses = train_tiny(arch, tmp_path, steps=6)
    assert losses[-1] < losses[0]
    kinds = {name.rpartition(".")[2] for name in expert_layers(result.model)}
    expected = {
        "gpt2": {"c_attn", "c_proj", "c_fc"},
        "phi3": {"qkv_proj", "gate_up_proj"},
        "gpt_neox": {"query_key_value", "dense_h_to_4h"},
    }
    assert expected.get(arch, {"q_proj"}) <= kinds
    fresh = tiny_model(arch)
    load_adapter(fresh, tmp_path / "run")
    result.model.eval()
    torch.testing.assert_close(logits(fresh), logits(result.model), rtol=0, atol=1e-5)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] == (arch == "gpt2")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_peft_adapters_load_here_and_ours_in_peft_with_the_same_logits(arch, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    peft_model = get_peft_model(
        tiny_model(arch),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ours = tiny_model(arch)
    load_adapter(ours, tmp_path / "peft")
    assert (logits(ours) - logits(peft_model)).abs().max() < 1e-5

    mine = adapted(arch, seed=1)
    save_adapter(mine, tmp_path / "ours", base_model=arch)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours").eval()
    assert (logits(loaded) - logits(mine)).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_loss_equals_the_models_own(arch):
    """The loop's chunked loss is the model's ``labels=`` loss (Gemma2's soft-capping too)."""
    model = adapted(arch)
    labels = TOKENS.clone()
    labels[:, :5] = -100  # a prompt whose tokens carry no loss
    batch = {"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS), "labels": labels}
    with torch.no_grad():
        expected = model(input_ids=TOKENS, labels=labels).loss
        ours = summed_loss(model, batch) / (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_and_unmerge_keep_the_logits(arch):
    model = adapted(arch)
    before = logits(model)
    weights = {
        n.replace(".base", ""): p.clone() for n, p in model.named_parameters() if "lora" not in n
    }
    merge_experts(model)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    unmerge_experts(model)
    remove_experts(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("router", ["mola", "radargate", "smora", "softmax"])
def test_mixtures_train_on_every_architecture(arch, router):
    model = tiny_model(arch)
    settings = {
        "mola": {"expert_pattern": "2,3", "top_k": 2, "aux_coef": 0.01},
        "radargate": {"num_experts": 3},
        "smora": {"rank": 8, "top_k": 2},
        "softmax": {"num_experts": 3},
    }[router]
    mixture = build_mixture(model, router, settings)
    if router == "mola":  # two depth groups over two blocks: 2 experts low, 3 high
        counts = {block_index(n): layer.num_experts for n, layer in mixture.layers.items()}
        assert counts == {0: 2, 1: 3}
    model.train()
    loss = model(input_ids=TOKENS, labels=TOKENS).loss + mixture.aux_loss()
    loss.backward()
    grads = [p.grad for p in mixture.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_block_index_reads_every_naming():
    assert block_index("model.layers.3.self_attn.q_proj") == 3
    assert block_index("transformer.h.11.attn.c_attn") == 11
    assert block_index("gpt_neox.layers.0.attention.query_key_value") == 0
    assert block_index("lm_head") == 0


def test_remove_experts_leaves_the_bare_model_even_after_xlora(tmp_path):
    folders = []
    for seed in range(2):
        donor = adapted("qwen2", seed)
        folders.append(str(save_adapter(donor, tmp_path / f"a{seed}")))
    model = tiny_model("qwen2")
    bare = logits(model)
    decoder_hooks = len(model.get_decoder()._forward_pre_hooks)
    build_mixture(model, "xlora", {"adapters": folders})
    assert not torch.allclose(logits(model), bare)
    remove_experts(model)
    assert len(model.get_decoder()._forward_pre_hooks) == decoder_hooks
    torch.testing.assert_close(logits(model), bare, rtol=0, atol=0)


def test_merge_refuses_routed_layers():
    from rankwise.errors import RankwiseError

    model = tiny_model("llama")
    build_mixture(model, "mola", {"target_modules": ["q_proj"]})
    with pytest.raises(RankwiseError, match="cannot merge experts routed by MoLA"):
        merge_experts(model)


def test_one_target_module_name_on_the_command_line_is_a_name():
    from rankwise.adapters.inject import parse_targets

    assert parse_targets("q_proj") == ["q_proj"]
    assert parse_targets("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_targets("all-linear") == "all-linear"
    model = tiny_model("llama")
    layers = inject_adapter(model, LoraConfig(r=2, target_modules=parse_targets("q_proj")))
    assert sorted(layers) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_a_model_without_linear_layers_is_refused_in_one_line():
    from rankwise.errors import RankwiseError

    with pytest.raises(RankwiseError, match="no linear layers adapters can target"):
        inject_adapter(torch.nn.Sequential(torch.nn.ReLU()), LoraConfig())


def test_importing_rankwise_leaves_the_matplotlib_backend_alone(tmp_path):
    script = (
        "import matplotlib; matplotlib.use('svg');"
        "import rankwise, rankwise.train.metrics, rankwise.mixture.inspect;"
        "print(matplotlib.get_backend())"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "svg", out.stderr


def test_loss_chunks_sit_on_the_models_device():
    """The loss is summed where the model is (a device scalar), never moved to the CPU."""
    model = adapted("llama")
    batch = collate([{"input_ids": [3, 4, 5, 6], "labels": [3, 4, 5, 6]}], pad_id=0)
    assert summed_loss(model, batch).device == next(model.parameters()).device


def test_tiny_configs_differ_as_their_families_do():
    """The zoo keeps each family's distinguishing feature (a guard for the tests above)."""
    assert tiny_model("qwen2").model.layers[0].self_attn.q_proj.bias is not None
    assert hasattr(tiny_model("qwen3").model.layers[0].self_attn, "q_norm")
    assert tiny_model("gemma2").config.final_logit_softcapping
    gpt2 = tiny_model("gpt2")
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert Path(tiny_model.__code__.co_filename).name == "architectures.py"

"""KaSA (arXiv 2412.06071) against PEFT's: the same truncated base, logits both ways, the same
regularisation; exact merge, and the base given back whole when the experts are removed."""

from __future__ import annotations

import pytest
import torch
from architectures import tiny_model

from rankwise.adapters import (
    LoraConfig,
    attach_adapters,
    expert_layers,
    inject_adapter,
    load_adapter,
    merge_experts,
    read_adapter,
    remove_experts,
    save_adapter,
    unmerge_experts,
)
from rankwise.adapters.inject import adaptable_modules, module_kinds
from rankwise.adapters.kasa import KaSA
from rankwise.architectures import dense_weight
from rankwise.errors import RankwiseError
from rankwise.models import LoadedModel
from rankwise.train import TrainConfig
from rankwise.train.trainable import LoraAdapter

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
ARCHS = ["llama", "qwen2", "phi3", "gpt_neox"]  # PEFT's KaSA takes nn.Linear layers only


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


def kasa_model(arch: str) -> torch.nn.Module:
    """A rank-4 KaSA adapter on every linear layer with B random (so the update is not zero)."""
    model = tiny_model(arch)
    torch.manual_seed(1)
    for layer in inject_adapter(model, LoraConfig(r=4, lora_alpha=8, init="kasa")).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def peft_kasa(arch: str) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora.config import KasaConfig

    model = tiny_model(arch)
    config = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=module_kinds(adaptable_modules(model)),
        kasa_config=KasaConfig(),
        init_lora_weights=False,  # B random too
    )
    return get_peft_model(model, config)


@pytest.mark.parametrize("arch", ARCHS)
def test_kasa_adapters_move_between_peft_and_rankwise_with_the_same_logits(arch, tmp_path):
    from peft import PeftModel

    theirs = peft_kasa(arch).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_model(arch)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)

    mine = kasa_model(arch)
    save_adapter(mine, tmp_path / "ours")
    assert read_adapter(tmp_path / "ours").variant == "KaSA"
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded), logits(mine), atol=1e-5, rtol=0)


def test_truncation_and_regularisation_equal_peft():
    theirs = peft_kasa("llama")
    ours = tiny_model("llama")
    layers = inject_adapter(ours, LoraConfig(r=4, lora_alpha=8, init="kasa"))
    state = theirs.state_dict()
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        torch.testing.assert_close(layer.base.weight, state[f"{prefix}.base_layer.weight"])
        with torch.no_grad():
            layer.lora_A.copy_(state[f"{prefix}.lora_A.default.weight"])
            layer.lora_B.copy_(state[f"{prefix}.lora_B.default.weight"])
            layer.policy.diagonal.copy_(state[f"{prefix}.lora_diag.default"])
    ours_loss = sum(layer.policy.regularisation(layer) for layer in layers.values())
    torch.testing.assert_close(ours_loss, theirs.base_model._get_kasa_loss())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kasa_merges_exactly_and_gives_the_base_back(arch):
    """GPT-2's Conv1D too (PEFT refuses it): the truncation works on the [out, in] view."""
    original = {n: dense_weight(m).clone() for n, m in adaptable_modules(tiny_model(arch)).items()}
    model = kasa_model(arch)
    for name, layer in expert_layers(model).items():
        s = torch.linalg.svdvals(dense_weight(layer.base).float())
        assert (s[-4:] < 1e-5).all() and (s[:-4] > 1e-5).all(), name  # rank k - r
    before = logits(model)
    merge_experts(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    unmerge_experts(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    removed = remove_experts(model)
    for name, layer in removed.items():
        torch.testing.assert_close(dense_weight(layer.base), original[name], atol=1e-5, rtol=0)


def test_kasa_trains_with_its_penalties_in_the_loss():
    model = tiny_model("llama")
    adapter = LoraAdapter(LoadedModel(model, None, "tiny"), _config(init="kasa", kasa_gamma=0.5))
    assert all(isinstance(layer.policy, KaSA) for layer in adapter.layers.values())
    assert any(p.shape == (4,) for p in adapter.parameters())  # the diagonals train
    penalty = adapter.aux_loss()
    assert penalty > 0 and penalty.requires_grad
    penalty.backward()
    assert all(layer.lora_A.grad is not None for layer in adapter.layers.values())


def test_kasa_refusals(tmp_path):
    with pytest.raises(RankwiseError, match="do not combine"):
        LoraConfig(init="kasa", use_dora=True)
    with pytest.raises(RankwiseError, match="KaSA needs r"):
        inject_adapter(tiny_model("llama"), LoraConfig(r=32, init="kasa"))
    ours = kasa_model("llama")
    weights = read_adapter(save_adapter(ours, tmp_path))
    with pytest.raises(RankwiseError, match="is a KaSA adapter"):
        attach_adapters(tiny_model("llama"), [weights, weights], ["a", "b"])


def _config(**settings) -> TrainConfig:
    return TrainConfig.from_mapping({"r": 4, "lora_alpha": 8, **settings})

"""DoRA and LoRA+ against PEFT: the same logits, gradients and optimizer updates."""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, tiny_model

from rankwise.adapters import (
    LoraConfig,
    expert_layers,
    inject_adapter,
    load_adapter,
    merge_experts,
    read_adapter,
    save_adapter,
    unmerge_experts,
)
from rankwise.adapters.dora import DoRA
from rankwise.errors import RankwiseError
from rankwise.models import LoadedModel
from rankwise.train.loop import parameter_groups
from rankwise.train.trainable import LoraAdapter

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def dora_model(arch: str, seed: int = 1) -> torch.nn.Module:
    """A rank-4 DoRA adapter on every linear layer, B random and magnitudes off ||W||."""
    model = tiny_model(arch)
    torch.manual_seed(seed)
    for layer in inject_adapter(model, LoraConfig(r=4, lora_alpha=8, use_dora=True)).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        with torch.no_grad():
            layer.policy.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.policy.magnitude))
    return model


def peft_dora(arch: str) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False
    )
    model = get_peft_model(tiny_model(arch), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dora_adapters_move_between_peft_and_rankwise_with_the_same_logits(arch, tmp_path):
    from peft import PeftModel

    theirs = peft_dora(arch).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_model(arch)
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert (ours(TOKENS).logits - theirs(input_ids=TOKENS).logits).abs().max() < 1e-5
    mine = dora_model(arch)
    save_adapter(mine, tmp_path / "ours")
    assert read_adapter(tmp_path / "ours").magnitudes
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (loaded(input_ids=TOKENS).logits - mine(TOKENS).logits).abs().max() < 1e-5


def test_dora_gradients_equal_peft(tmp_path):
    """In training mode (no dropout) both give the same loss and the same gradients for A, B
    and the magnitude: the row norm is a constant of the forward in both."""
    theirs = peft_dora("qwen2")
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_model("qwen2")
    layers = load_adapter(ours, tmp_path / "peft")
    for layer in layers.values():
        layer.requires_grad_(True)
        layer.base.requires_grad_(False)
    ours.train(), theirs.train()
    ours(input_ids=TOKENS, labels=TOKENS).loss.backward()
    theirs(input_ids=TOKENS, labels=TOKENS).loss.backward()
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        pairs = {
            "lora_A": f"{prefix}.lora_A.default.weight",
            "lora_B": f"{prefix}.lora_B.default.weight",
            "lora_magnitude_vector": f"{prefix}.lora_magnitude_vector.default.weight",
        }
        for key, param in layer.adapter_params().items():
            torch.testing.assert_close(param.grad, peft_grads[pairs[key]], atol=1e-6, rtol=1e-4)


def test_dora_starts_at_the_base_model_and_merges_exactly():
    model = tiny_model("llama")
    base = model(TOKENS).logits
    layers = inject_adapter(model, LoraConfig(r=4, use_dora=True))
    torch.testing.assert_close(model(TOKENS).logits, base, atol=1e-6, rtol=0)  # m = ||W||, BA = 0
    model = dora_model("gpt2")
    before = model(TOKENS).logits
    weights = {n: p.clone() for n, p in model.named_parameters()}
    merge_experts(model)
    torch.testing.assert_close(model(TOKENS).logits, before, atol=1e-5, rtol=1e-5)
    unmerge_experts(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=1e-5)
    assert all(isinstance(layer.policy, DoRA) for layer in layers.values())


def test_dora_norm_from_rank_space_equals_the_dense_norm():
    model = dora_model("phi3")
    for layer in expert_layers(model).values():
        dense = layer.base.weight + layer.delta_weight()
        torch.testing.assert_close(
            layer.policy.weight_norm(layer), dense.norm(dim=1), atol=1e-5, rtol=1e-5
        )


def test_dora_adapters_do_not_stack_as_experts(tmp_path):
    from rankwise.adapters import attach_adapters

    save_adapter(dora_model("llama"), tmp_path / "d")
    weights = read_adapter(tmp_path / "d")
    with pytest.raises(RankwiseError, match="DoRA adapters attach one at a time"):
        attach_adapters(tiny_model("llama"), [weights, weights])


def test_loraplus_updates_equal_peft():
    """One AdamW step with LoRA+ (ratio 16) moves A and B exactly as PEFT's LoRA+ optimizer."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    peft_model = get_peft_model(
        tiny_model("llama"),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    torch.nn.init.normal_(
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    )
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    ours_model = tiny_model("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    class Config:  # what LoraAdapter reads of a training config
        init = config.init
        init_adapter = None

        def lora(self):
            return config

    trainable = LoraAdapter(LoadedModel(ours_model, None, "tiny"), Config())
    peft_state = {
        k.replace("base_model.model.", "").replace(".default", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora" in k
    }
    with torch.no_grad():
        for name, layer in trainable.layers.items():
            layer.lora_A.copy_(peft_state[f"{name}.lora_A.weight"])
            layer.lora_B.copy_(peft_state[f"{name}.lora_B.weight"])
    groups = parameter_groups(trainable, 16.0)
    for group in groups:
        group["lr"] = 1e-3 * group["lr_scale"]
    ours = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)  # PEFT: loraplus_weight_decay 0
    for model, optimizer in ((peft_model, theirs), (ours_model, ours)):
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
    after = {
        k.replace("base_model.model.", "").replace(".default", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora" in k
    }
    for name, layer in trainable.layers.items():
        torch.testing.assert_close(layer.lora_A, after[f"{name}.lora_A.weight"])
        torch.testing.assert_close(layer.lora_B, after[f"{name}.lora_B.weight"])
    assert [g["lr_scale"] for g in groups] == [1.0, 16.0]


def test_dora_adapters_are_refused_where_they_cannot_work(tmp_path):
    """X-LoRA mixes plain adapters per token and the server batches plain adapters."""
    from test_serve_support import tiny_tokenizer

    from rankwise.mixture import build_mixture
    from rankwise.serve.engine import Engine, EngineConfig

    save_adapter(dora_model("llama"), tmp_path / "d")
    with pytest.raises(RankwiseError, match="is a DoRA adapter"):
        build_mixture(tiny_model("llama"), "xlora", {"adapters": [str(tmp_path / "d")]})
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), EngineConfig(max_rank=8))
    with pytest.raises(RankwiseError, match="is a DoRA adapter"):
        engine.register("d", read_adapter(tmp_path / "d"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "phi3"])
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_weight_aware_inits_equal_peft_and_save_for_the_original_base(arch, init, tmp_path):
    """PiSSA and OLoRA: the same factors and residual W as PEFT; the adapted model starts equal
    to the base; the saved adapter is PEFT's rank-2r conversion, loading on the untouched base
    with the trained model's logits; removing the adapter gives W back."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from rankwise.adapters import remove_experts

    if arch == "gpt2" and init == "olora":
        pytest.skip("PEFT's OLoRA factors a Conv1D's stored [in, out] weight: wrong shapes")
    base = logits_of(tiny_model(arch))
    model = tiny_model(arch)
    torch.manual_seed(0)
    layers = inject_adapter(model, LoraConfig(r=4, lora_alpha=8, init=init))
    torch.testing.assert_close(logits_of(model), base, atol=1e-5, rtol=0)
    if not init.startswith("pissa_niter"):  # the randomized SVD draws its own numbers
        torch.manual_seed(0)
        peft_config = PeftLoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init
        )
        state = get_peft_model(tiny_model(arch), peft_config).state_dict()
        for name, layer in layers.items():
            prefix = f"base_model.model.{name}"
            torch.testing.assert_close(layer.lora_A, state[f"{prefix}.lora_A.default.weight"])
            torch.testing.assert_close(layer.base.weight, state[f"{prefix}.base_layer.weight"])
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    trained = logits_of(model)
    save_adapter(model, tmp_path / "converted")
    saved = read_adapter(tmp_path / "converted")
    assert {saved.rank(m) for m in saved.factors} == {8}
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "converted").eval()
    assert (logits_of(loaded) - trained).abs().max() < 1e-5
    ours = tiny_model(arch)
    load_adapter(ours, tmp_path / "converted")  # a plain rank-8 LoRA on the original base
    assert (logits_of(ours) - trained).abs().max() < 1e-5
    remove_experts(model)
    torch.testing.assert_close(logits_of(model), base, atol=1e-5, rtol=0)


def test_a_residual_layer_takes_back_the_trained_half_of_its_conversion(tmp_path):
    """Resuming a PiSSA run: the checkpoint holds the rank-2r conversion; the rebuilt layers
    (the same init again) take its first half, and refuse an adapter from another start."""
    from rankwise.adapters import copy_factors

    def pissa_model():
        model = tiny_model("llama")
        return model, inject_adapter(model, LoraConfig(r=4, init="pissa"))

    model, layers = pissa_model()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    save_adapter(model, tmp_path / "checkpoint")
    fresh, fresh_layers = pissa_model()
    copy_factors(fresh_layers, [read_adapter(tmp_path / "checkpoint")])
    torch.testing.assert_close(logits_of(fresh), logits_of(model))
    save_adapter(dora_model("llama"), tmp_path / "other")
    with pytest.raises(RankwiseError, match="trained from another start"):
        copy_factors(pissa_model()[1], [read_adapter(tmp_path / "other")])


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_gives_peft_residual_and_update(arch, mode):
    """CorDA from the same calibration batch: the residual W and the adapter's update B A equal
    PEFT's. (How the update splits between A and B scales with the covariance's normalisation:
    ours is E[x x^T] over tokens, PEFT's a per-forward max-normalised sum; see weight_init.)"""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from rankwise.adapters.inject import adaptable_modules, module_kinds
    from rankwise.adapters.weight_init import corda
    from rankwise.architectures import dense_weight
    from rankwise.compress.calibration import GRAM, collect_statistics

    ids = torch.randint(3, 60, (1, 64), generator=torch.Generator().manual_seed(0))
    reference = tiny_model(arch)
    config = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=module_kinds(adaptable_modules(reference)),
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )
    preprocess_corda(reference, config, run_model=lambda: reference(ids))
    state = get_peft_model(reference, config).state_dict()
    model = tiny_model(arch)
    modules = adaptable_modules(model)
    stats = collect_statistics(model, ids, {n: {GRAM} for n in modules}, batch_size=1)
    initial = {
        n: corda(dense_weight(m).float(), stats.gram[n], 4, 2.0, mode == "ipm")
        for n, m in modules.items()
    }
    layers = inject_adapter(model, LoraConfig(r=4, lora_alpha=8, init=f"corda_{mode}"), initial)
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        update = state[f"{prefix}.lora_B.default.weight"] @ state[f"{prefix}.lora_A.default.weight"]
        torch.testing.assert_close(layer.lora_B @ layer.lora_A, update, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(
            layer.base.weight, state[f"{prefix}.base_layer.weight"], rtol=1e-3, atol=2e-4
        )
    with pytest.raises(RankwiseError, match="needs calibration data"):
        inject_adapter(tiny_model(arch), LoraConfig(r=4, init="corda_ipm"))

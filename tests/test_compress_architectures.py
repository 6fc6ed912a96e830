"""Compression on tiny models of every architecture: the SVD family everywhere, A³ where it applies.

The SVD family must handle GPT-2's Conv1D ([in, out] weights), fused projections (Phi-3,
GPT-NeoX), biases (Qwen2), tied embeddings (Gemma2, GPT-2) and blocks named ``h.N``. A³ covers
the Llama-style families and must refuse the others before any calibration forward runs.
"""

from __future__ import annotations

import logging

import pytest
import torch
from architectures import ARCHITECTURES, VOCAB, WINDOW, tiny_model, word_tokenizer
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, Qwen2Config
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from rankwise.architectures import LLAMA_STYLE, decoder_blocks, is_linear
from rankwise.compress import (
    A3Attention,
    LowRankLinear,
    collect_statistics,
    compress,
    compress_model,
    factorize_linear,
    load_compressed,
    make_compressor,
    model_costs,
    save_compressed,
)
from rankwise.compress.a3 import channel_energy
from rankwise.compress.base import input_key, layer_linears
from rankwise.compress.calibration import GRAM, MEAN
from rankwise.errors import RankwiseError
from rankwise.models import load_model

SVD_FAMILY = ("svd", "asvd", "svd-llm")
REFUSED_BY_A3 = tuple(arch for arch in ARCHITECTURES if arch not in LLAMA_STYLE)
CLOSE = dict(atol=1e-5, rtol=1e-4)


def perturbed(model: nn.Module) -> nn.Module:
    """``model`` with every vector parameter randomised: biases around 0, norm weights around 1.

    Freshly built models have zero biases and unit norm weights, which would hide mistakes in
    how biases (Qwen2's q/k/v) and per-head norms (Qwen3's q_norm/k_norm) are carried over.
    """
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                noise = 0.1 * torch.randn(param.shape, generator=generator)
                param.copy_(noise if name.endswith("bias") else 1 + noise)
    return model


def model_of(arch: str) -> nn.Module:
    return perturbed(tiny_model(arch))


def sliding_qwen2() -> nn.Module:
    """A tiny Qwen2 whose second layer slides (a window of 8), as ``max_window_layers`` allows."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=WINDOW, max_window_layers=1,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.1)
    return perturbed(model.eval().requires_grad_(False))


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def tokens() -> torch.Tensor:
    """Longer than the sliding window, so windows matter."""
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def compressed(model: nn.Module, method: str, ratio: float, calib: torch.Tensor, **options):
    compressor = make_compressor(method, **options)
    compress_model(
        model, compressor, ratio, collect_statistics(model, calib, compressor.needs(model))
    )
    return model


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_rank_factors_reproduce_every_architecture(arch, tokens):
    """Conv1D's [in, out] weight, fused projections and biases are factored the right way round."""
    model = model_of(arch)
    expected = logits(model, tokens)
    _, blocks = decoder_blocks(model)
    for block in blocks:
        for name, linear in layer_linears(block).items():
            rank = min(linear.weight.shape)
            block.set_submodule(name, factorize_linear(linear, rank))
    torch.testing.assert_close(logits(model, tokens), expected, **CLOSE)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_inputs_read_the_same_tensor(arch, calib):
    """Every pair in architectures.SHARED_INPUTS really reads one tensor in this architecture."""
    model = model_of(arch)
    prefix, blocks = decoder_blocks(model)
    names = [
        f"{prefix}.{i}.{name}" for i, block in enumerate(blocks) for name in layer_linears(block)
    ]
    seen: dict[str, torch.Tensor] = {}
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, args[0])
        )
    logits(model, calib)
    shared = [(name, input_key(model, name)) for name in names if input_key(model, name) != name]
    assert bool(shared) == (arch in ("llama", "mistral", "qwen2", "qwen3", "gemma2"))
    assert all(seen[name] is seen[key] for name, key in shared)


@pytest.mark.parametrize("method", SVD_FAMILY)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_svd_family_compresses_saves_and_loads_every_architecture(
    arch, method, calib, tokens, tmp_path
):
    model = model_of(arch)
    head = model.get_output_embeddings().weight.clone()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = model_costs(model).linear_params
    compressed(model, method, 0.3, calib)
    _, blocks = decoder_blocks(model)
    assert not any(is_linear(m) for b in blocks for m in b.modules() if not_in_factors(b, m))
    assert 1 - model_costs(model).linear_params / before == pytest.approx(0.3, abs=0.05)
    out = logits(model, tokens)
    assert torch.isfinite(out).all()
    assert torch.equal(model.get_output_embeddings().weight, head)  # the head is never factored
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied

    assert not save_compressed(model, word_tokenizer(), tmp_path / "out", {"method": method})
    loaded = load_compressed(tmp_path / "out")
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    torch.testing.assert_close(logits(loaded, tokens), out, **CLOSE)
    torch.testing.assert_close(
        logits(load_model(str(tmp_path / "out")).model, tokens), out, **CLOSE
    )


def not_in_factors(block: nn.Module, module: nn.Module) -> bool:
    """Whether ``module`` is a linear map of ``block`` that is not half of a ``LowRankLinear``."""
    factors = {id(f) for m in block.modules() if isinstance(m, LowRankLinear) for f in m.children()}
    return id(module) not in factors


def attention_calls(model: nn.Module, tokens: torch.Tensor) -> list[dict]:
    """The keyword arguments every attention layer hands to its kernel (eager underneath)."""
    calls: list[dict] = []

    def record(module, query, key, value, mask, **kwargs):
        calls.append({"sliding_window": kwargs.get("sliding_window"), "scaling": kwargs["scaling"]})
        return eager_attention_forward(module, query, key, value, mask, **kwargs)

    AttentionInterface.register("rankwise_record", record)
    model.set_attn_implementation("rankwise_record")
    try:
        logits(model, tokens)
    finally:
        model.set_attn_implementation("eager")
    return calls


A3_MODELS = {arch: lambda arch=arch: model_of(arch) for arch in LLAMA_STYLE}
A3_MODELS["qwen2-sliding"] = sliding_qwen2


@pytest.mark.parametrize("arch", sorted(A3_MODELS))
def test_a3_at_ratio_zero_reproduces_the_model(arch, calib, tokens):
    model = A3_MODELS[arch]()
    expected = logits(model, tokens)
    compressed(model, "a3", 0.0, calib)
    assert all(isinstance(b.self_attn, A3Attention) for b in decoder_blocks(model)[1])
    torch.testing.assert_close(logits(model, tokens), expected, **CLOSE)


@pytest.mark.parametrize("arch", sorted(A3_MODELS))
def test_a3_shrinks_keeps_windows_decodes_and_round_trips(arch, calib, tokens, tmp_path):
    model = A3_MODELS[arch]()
    windows = attention_calls(model, tokens)
    before = model_costs(model)
    compressed(model, "a3", 0.25, calib)
    after = model_costs(model)
    assert after.linear_params < before.linear_params
    assert after.kv_bytes_per_token < before.kv_bytes_per_token
    assert attention_calls(model, tokens) == windows  # same window and scale in every layer
    full = logits(model, tokens)
    assert torch.isfinite(full).all()
    with torch.no_grad():
        prefix = model(tokens[:, :-1], use_cache=True)
        step = model(tokens[:, -1:], past_key_values=prefix.past_key_values).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], **CLOSE)
    save_compressed(model, word_tokenizer(), tmp_path / "out", {})
    torch.testing.assert_close(logits(load_compressed(tmp_path / "out"), tokens), full, **CLOSE)


def test_windows_reach_the_kernel_per_layer(tokens):
    assert [c["sliding_window"] for c in attention_calls(sliding_qwen2(), tokens)] == [None, WINDOW]
    assert [c["sliding_window"] for c in attention_calls(model_of("mistral"), tokens)] == [
        WINDOW
    ] * 2


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_a3_keeps_scores_of_kept_pairs_exact_biases_included(arch, calib):
    original = model_of(arch)
    model = compressed(model_of(arch), "a3", 0.5, calib)
    attn, old = model.model.layers[1].self_attn, original.model.layers[1].self_attn
    x = torch.randn(2, 9, 32)
    cos_sin = original.model.rotary_emb(x, torch.arange(9)[None].expand(2, -1))
    q, k = attn.rotated_qk(x, cos_sin)  # (B, H, T, w), (B, Hkv, T, w)
    full_q = old.q_proj(x).view(2, 9, 4, -1).transpose(1, 2)  # (B, H, T, d)
    full_k = old.k_proj(x).view(2, 9, 2, -1).transpose(1, 2)  # (B, Hkv, T, d)
    full_q, full_k = apply_rotary_pos_emb(full_q, full_k, *cos_sin)
    assert attn.qk_dim == 4
    for head in range(4):
        kept = attn.rope_index[head // 2]  # the channels of the head's KV group
        reference = full_q[:, head, :, kept] @ full_k[:, head // 2, :, kept].transpose(1, 2)
        scores = q[:, head] @ k[:, head // 2].transpose(1, 2)  # (B, T, T)
        torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)


def test_pair_scores_count_the_bias(calib):
    """E[q_i²] from the statistics equals the mean of (w_i·x + b_i)² over the calibration."""
    model = model_of("qwen2")
    name = "model.layers.0.self_attn.q_proj"
    inputs = []
    model.get_submodule(name).register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    stats = collect_statistics(model, calib, {name: {GRAM, MEAN}})
    linear = model.get_submodule(name)
    expected = linear(torch.cat(inputs).reshape(-1, 32)).double().square().mean(0)
    torch.testing.assert_close(channel_energy(linear, stats.gram[name], stats.mean[name]), expected)


def test_a3_leaves_qk_of_qwen3_whole_and_says_why(calib, tokens, caplog):
    model = model_of("qwen3")
    with caplog.at_level(logging.WARNING, logger="rankwise.compress.a3"):
        compressed(model, "a3", 0.5, calib)
    assert "q_norm/k_norm" in caplog.text and "shrinking ov, mlp only" in caplog.text
    attn = model.model.layers[0].self_attn
    assert attn.qk_dim == 8 and attn.value_dim == 4
    assert model.model.layers[0].mlp.down_proj.in_features == 32
    with pytest.raises(RankwiseError, match="cannot shrink qk"):
        compress_model(model_of("qwen3"), make_compressor("a3", components=["qk"]), 0.5, None)


@pytest.mark.parametrize("arch", REFUSED_BY_A3)
def test_a3_refuses_other_architectures_before_calibrating(arch):
    model = model_of(arch)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(RankwiseError, match=rf"a3 supports .*llama.*; this model is '{arch}'"):
        compress(model, word_tokenizer(), "a3", 0.25, data="/nonexistent/calib.jsonl")
    assert not forwards  # no calibration pass, and the data was never read

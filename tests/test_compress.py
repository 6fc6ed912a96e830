"""Compression methods on tiny random Llamas: budgets, exactness, whitening, A³'s kept pairs."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rankwise.compress import (
    METHODS,
    A3Attention,
    collect_statistics,
    compress,
    compress_model,
    factorize_linear,
    make_compressor,
    model_costs,
)
from rankwise.compress.calibration import GRAM
from rankwise.errors import RankwiseError

# methods that take any --ratio (2:4 pruning removes exactly half, keeping dense shapes)
ANY_RATIO = sorted(m for m, cls in METHODS.items() if cls.fixed_ratio is None)


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(2))


def compressed(method: str, ratio, calib: torch.Tensor, **options) -> nn.Module:
    model = tiny_llama(hidden=64)
    compressor = make_compressor(method, **options)
    stats = collect_statistics(model, calib, compressor.needs(model))
    compress_model(model, compressor, ratio, stats)
    return model


@pytest.mark.parametrize("method", ANY_RATIO)
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_every_method_removes_about_the_ratio(method, ratio, calib):
    before = model_costs(tiny_llama(hidden=64)).linear_params
    after = model_costs(compressed(method, ratio, calib)).linear_params
    assert 1 - after / before == pytest.approx(ratio, abs=0.03)


def test_per_layer_ratios_are_applied_layer_by_layer(calib):
    model = compressed("a3", [0.0, 0.5], calib)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths == [128, 64]


def test_svd_at_full_rank_reproduces_the_model(tokens):
    model = tiny_llama()
    expected = model(tokens).logits
    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if isinstance(linear, nn.Linear):
                rank = min(linear.in_features, linear.out_features)
                layer.set_submodule(name, factorize_linear(linear, rank))
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-4)


def linear_inputs(model: nn.Module, name: str, calib: torch.Tensor) -> torch.Tensor:
    """The calibration inputs (N, in) of one module, captured with a hook."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(calib)
    handle.remove()
    return torch.cat(seen).double()


@pytest.mark.parametrize(
    "name", ["model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
)
def test_svd_llm_whitened_error_is_at_most_plain_svd(name, calib):
    model = tiny_llama(hidden=64)
    x = linear_inputs(model, name, calib)  # (N, in)
    linear = model.get_submodule(name)
    rank = 10
    errors = {}
    for method in ("svd", "svd-llm"):
        compressor = make_compressor(method)
        stats = collect_statistics(model, calib, {name: {GRAM}})
        approx = factorize_linear(linear, rank, *compressor.whitening(stats, name))
        delta = linear.weight.double() - (approx.second.weight @ approx.first.weight).double()
        errors[method] = (x @ delta.T).norm()
    assert errors["svd-llm"] <= errors["svd"]
    assert errors["svd-llm"] < 0.9 * errors["svd"]  # and whitening clearly helps here


def test_a3_at_ratio_zero_reproduces_the_model(tokens, calib):
    expected = tiny_llama(hidden=64)(tokens).logits
    model = compressed("a3", 0.0, calib)
    assert isinstance(model.model.layers[0].self_attn, A3Attention)
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-4)


def test_a3_at_ratio_zero_folds_biases_exactly(tokens, calib):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.normal_()
    expected = model(tokens).logits
    compressor = make_compressor("a3")
    compress_model(
        model, compressor, 0.0, collect_statistics(model, calib, compressor.needs(model))
    )
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-4)


def test_a3_keeps_scores_of_kept_rope_pairs_exact(calib):
    original = tiny_llama(hidden=64)
    model = compressed("a3", 0.5, calib)
    attn = model.model.layers[1].self_attn
    old = original.model.layers[1].self_attn
    x = torch.randn(2, 9, 64)
    position_ids = torch.arange(9)[None].expand(2, -1)
    cos_sin = original.model.rotary_emb(x, position_ids)
    q, k = attn.rotated_qk(x, cos_sin)  # (B, H, T, w), (B, Hkv, T, w)
    full_q = old.q_proj(x).view(2, 9, 4, -1).transpose(1, 2)  # (B, H, T, d)
    full_k = old.k_proj(x).view(2, 9, 2, -1).transpose(1, 2)  # (B, Hkv, T, d)
    full_q, full_k = apply_rotary_pos_emb(full_q, full_k, *cos_sin)
    assert attn.qk_dim == 8 and attn.rope_index.shape == (2, 8)
    for head in range(4):
        kept = attn.rope_index[head // 2]  # the channels of the head's KV group
        reference = full_q[:, head, :, kept] @ full_k[:, head // 2, :, kept].transpose(1, 2)
        scores = q[:, head] @ k[:, head // 2].transpose(1, 2)  # (B, T, T)
        torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)


def test_a3_selects_pairs_per_kv_group_and_shrinks_the_kv_cache(calib):
    model = compressed("a3", 0.5, calib)
    attn = model.model.layers[0].self_attn
    half = attn.qk_dim // 2
    pairs = attn.rope_index[:, :half]
    assert torch.equal(attn.rope_index[:, half:], pairs + 8)  # each pair's partner channel
    assert model_costs(model).kv_bytes_per_token == 2 * 2 * (8 + 8) * 4  # layers·Hkv·(qk+v)·fp32


def test_a3_cached_decoding_matches_a_full_forward(tokens, calib):
    model = compressed("a3", 0.4, calib)
    full = model(tokens).logits[:, -1]
    prefix = model(tokens[:, :-1], use_cache=True)
    step = model(tokens[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_a3_mlp_only_leaves_attention_alone(calib):
    model = compressed("a3", 0.5, calib, components=("mlp",))
    assert not any(isinstance(m, A3Attention) for m in model.modules())
    assert model.model.layers[0].mlp.gate_proj.out_features == 64


def test_unknown_methods_options_and_recompression_are_errors(calib):
    with pytest.raises(RankwiseError, match="unknown method"):
        make_compressor("pca")
    with pytest.raises(RankwiseError, match="does not take"):
        make_compressor("svd", damping=0.1)
    with pytest.raises(RankwiseError, match="components"):
        make_compressor("a3", components=("qk", "ffn"))
    model = compressed("svd", 0.2, calib)
    with pytest.raises(RankwiseError, match="already compressed"):
        compress_model(model, make_compressor("svd"), 0.2, None)


def test_bad_ratio_fails_before_calibration():
    """The ratio is checked first: the missing calibration file is never read."""
    with pytest.raises(RankwiseError, match=r"ratios must lie in \[0, 1\)"):
        compress(tiny_llama(), None, "a3", 1.5, data="/nonexistent/calib.jsonl")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_options_are_declared_for_the_command_line(method):
    """Every option is a ``rankwise.options`` field with a help line, so flags can be generated."""
    cls = METHODS[method]
    parser = argparse.ArgumentParser()
    cls.add_flags(parser)
    fields = dataclasses.fields(cls)
    assert all(f.metadata["help"] for f in fields)
    flags = {a.dest for a in parser._actions} - {"help"}
    assert flags == {f.name for f in fields}
    assert make_compressor(method).settings()["method"] == method


def test_option_values_are_validated():
    with pytest.raises(RankwiseError, match=r"damping must be in \[0, inf\)"):
        make_compressor("a3", damping=-1.0)
    with pytest.raises(RankwiseError, match="alpha must be float"):
        make_compressor("asvd", alpha="half")
    parser = argparse.ArgumentParser()
    METHODS["a3"].add_flags(parser)
    args = parser.parse_args(["--components", "qk,mlp"])
    assert make_compressor("a3", **METHODS["a3"].values_from_args(args)).components == ["qk", "mlp"]

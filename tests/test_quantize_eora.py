"""EoRA against plain SVD of the compression error, the 2:4 pruner, ``rankwise compensate``."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_llama

from rankwise.adapters import load_adapter
from rankwise.cli import main
from rankwise.compress.calibration import cross_moments
from rankwise.compress.prune24 import prune_2_4
from rankwise.models import load_model
from rankwise.quantize.compensate import regressed_error
from rankwise.quantize.eora import eora_factors, svd_factors, weighted_error

pytestmark = pytest.mark.usefixtures("one_thread")


def anisotropic_gram(width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, width, generator=gen) * torch.logspace(0, -2, width)  # uneven inputs
    return (x.T @ x / 512).double()


def test_eora_weighted_error_is_below_plain_svd_at_equal_rank():
    delta = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)).double()
    gram = anisotropic_gram(64)
    for rank in (2, 8, 16):
        a, b = eora_factors(delta, gram, rank)
        sa, sb = svd_factors(delta, rank)
        assert a.shape == (rank, 64) and b.shape == (48, rank)
        eora = weighted_error(delta - b @ a, gram)
        plain = weighted_error(delta - sb @ sa, gram)
        assert eora < 0.9 * plain
    a, b = eora_factors(delta, gram, 48)  # full rank: the error is gone
    assert weighted_error(delta - b @ a, gram) < 1e-8 * weighted_error(delta, gram)


def test_eora_copes_with_a_singular_second_moment():
    delta = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)).double()
    gram = anisotropic_gram(16)
    gram[:, -4:] = gram[-4:, :] = 0  # inputs that never reach four columns
    a, b = eora_factors(delta, gram, 4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert weighted_error(delta - b @ a, gram) < weighted_error(delta, gram)


def test_2_4_pruning_keeps_the_two_largest_of_every_four():
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    pruned = weight.clone()
    prune_2_4(pruned)
    groups, original = pruned.view(6, 4, 4), weight.view(6, 4, 4)
    assert ((groups == 0).sum(-1) == 2).all()
    kept = original.abs().topk(2, dim=-1).values.sort(-1).values
    assert torch.equal(groups.abs().topk(2, dim=-1).values.sort(-1).values, kept)


def test_regression_predicts_removed_channels_from_the_kept_ones():
    # the removed inputs are a rank-3 mix of the kept ones: W_c + dW reproduces W exactly
    generator = torch.Generator().manual_seed(5)
    kept = torch.randn(400, 12, generator=generator, dtype=torch.float64)
    mix = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    removed = kept @ mix.T @ torch.randn(3, 5, generator=generator, dtype=torch.float64)
    full = torch.cat([kept, removed], 1)  # x, (tokens, 17); x_c = its first 12 channels
    weight = torch.randn(7, 17, generator=generator, dtype=torch.float64)
    gram, cross = kept.T @ kept / 400, full.T @ kept / 400
    delta = regressed_error(weight, weight[:, :12], cross, gram, damping=0.0).double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-5) == 3
    close = {"rtol": 1e-5, "atol": 1e-5}  # the error is float32, like a layer's weight
    torch.testing.assert_close((weight[:, :12] + delta) @ kept.T, weight @ full.T, **close)
    a, b = eora_factors(delta, gram, 3)
    torch.testing.assert_close((weight[:, :12] + b @ a) @ kept.T, weight @ full.T, **close)


def test_cross_moments_replay_each_block_on_the_compressed_models_hidden_state(tokens):
    # the reference differs only in layer 0's MLP: layer 1 sees the model's own hidden state,
    # so its reference inputs equal the model's (a run of the reference alone would differ)
    model = tiny_llama()
    reference = tiny_llama()
    with torch.no_grad():
        reference.model.layers[0].mlp.up_proj.weight.mul_(3.0)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    moments = cross_moments(model, reference, tokens, names)
    gram, cross = moments[names[1]]
    torch.testing.assert_close(cross, gram)
    gram, cross = moments[names[0]]
    torch.testing.assert_close(cross, 3.0 * gram)  # up_proj scales the MLP's hidden units


def logits_error_without_and_with(adapter, compressed, reference, shape):
    """The compressed model's logits error against the reference, before and after the adapter."""
    tokens = torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = load_model(str(reference)).model(tokens).logits
        model = load_model(str(compressed)).model
        before = (model(tokens).logits - dense).norm()
        load_adapter(model, adapter)
        return before, (model(tokens).logits - dense).norm()


@pytest.mark.parametrize("compressed_by", ["quantize", "prune24"])
def test_compensate_brings_a_compressed_model_closer_to_its_original(
    compressed_by, model_dir, tmp_path
):
    out = tmp_path / "compressed"
    if compressed_by == "quantize":
        args = ["quantize", "--method", "nf2", "--quant-block", "32"]
    else:
        args = ["compress", "--method", "prune24", "--ratio", "0.5"]
    assert main([*args, "--model", str(model_dir), "-o", str(out)]) == 0
    adapter = tmp_path / "eora"
    calib = ["--calib", "task:reverse_words", "--samples", "4", "--seq-len", "16"]
    compensate = ["compensate", "--model", str(out), "--reference", str(model_dir), *calib]
    assert main([*compensate, "--rank", "8", "-o", str(adapter)]) == 0
    before, after = logits_error_without_and_with(adapter, out, model_dir, shape=(2, 12))
    assert after < 0.8 * before


def test_compensate_regresses_what_a3_removed_from_what_it_kept(model_dir, tmp_path, capsys):
    # A³ narrows every layer: o_proj and down_proj are compensated by the regression, the
    # layers whose outputs narrowed (q/k/v, gate/up) are skipped and counted
    words = random.Random(0)
    lines = [" ".join(f"w{words.randrange(125)}" for _ in range(16)) for _ in range(200)]
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    calib = ["--calib", str(data), "--samples", "64", "--seq-len", "16"]
    out, adapter = tmp_path / "a3", tmp_path / "eora"
    compress = ["compress", "--method", "a3", "--ratio", "0.3", *calib]
    assert main([*compress, "--model", str(model_dir), "-o", str(out)]) == 0
    compensate = ["compensate", "--model", str(out), "--reference", str(model_dir), *calib]
    assert main([*compensate, "--rank", "8", "-o", str(adapter)]) == 0
    assert "eora rank 8 on 4 layers" in capsys.readouterr().out  # 2 layers × (o, down)
    before, after = logits_error_without_and_with(adapter, out, model_dir, shape=(8, 16))
    assert after < 0.9 * before  # a random model's channels are barely predictable: 0.81


def test_2_4_pruning_takes_only_half(model_dir, tmp_path, capsys):
    args = ["compress", "--model", str(model_dir), "--method", "prune24", "--ratio", "0.3"]
    assert main([*args, "-o", str(tmp_path / "out")]) == 2
    assert "prune24 removes exactly 0.5: give --ratio 0.5" in capsys.readouterr().err

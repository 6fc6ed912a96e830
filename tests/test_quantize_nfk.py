"""NF-k (2, 3, 4, 8 bits), its storage and the verb that writes it; LoftQ."""

from __future__ import annotations

import pytest
import torch
from architectures import tiny_model
from conftest import tiny_llama
from torch import nn

from rankwise.adapters import load_adapter, read_adapter
from rankwise.cli import main
from rankwise.models import load_model
from rankwise.quantize import BASES, NFkLinear, normal_float, quantize_model, weight_report
from rankwise.quantize.loftq import loftq_layer
from rankwise.quantize.nfk import dequantize_weight, pack, quantize_weight, unpack

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nf4_is_bitsandbytes_table():
    from rankwise.quantize.bnb import bitsandbytes

    table = bitsandbytes().functional.get_4bit_type("nf4", device="cpu")
    assert torch.allclose(normal_float(4), table.sort().values, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_normal_float_levels(bits):
    levels = normal_float(bits)
    assert len(levels) == 2**bits and (levels.diff() > 0).all()
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).any()
    assert (levels > 0).sum() == 2 ** (bits - 1)  # one more level on the positive side


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trips(bits):
    codes = torch.randint(0, 2**bits, (64,), generator=torch.Generator().manual_seed(0))
    packed = pack(codes.to(torch.uint8), bits)
    assert packed.numel() == 64 * bits // 8
    assert torch.equal(unpack(packed, bits, 64), codes)


def test_error_falls_with_bits_and_storage_is_k_bits_plus_constants():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in (2, 3, 4, 8):
        state = quantize_weight(weight, bits, 64)
        errors.append((dequantize_weight(state, bits, (64, 256)) - weight).norm() / weight.norm())
        stored = 8 * sum(t.numel() * t.element_size() for t in state.values())
        # k bits, an int8 absmax per block of 64, an fp32 scale per 256 blocks and the mean
        assert stored == 64 * 256 * bits + 8 * 256 + 32 + 32
    assert errors == sorted(errors, reverse=True) and errors[2] < 0.12 and errors[3] < 0.02


def test_dequantise_matmul_passes_gradients_to_the_input_only():
    torch.manual_seed(0)
    dense = nn.Linear(64, 16)
    layer = NFkLinear.from_weight(dense.weight, dense.bias, 3, 32)
    assert not any(
        t.is_floating_point() and t.shape == (16, 64) for t in layer.state_dict().values()
    )
    x = torch.randn(2, 5, 64, requires_grad=True)
    reference = nn.functional.linear(x, layer.dequantized(), dense.bias)
    y = layer(x)
    assert torch.allclose(y, reference, atol=1e-5)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    (want,) = torch.autograd.grad(reference.square().sum(), x)
    assert torch.allclose(grad, want, atol=1e-4)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("method", ["nf2", "nf3", "nf8"])
def test_own_bases_on_load_train_gpt2_conv1d(method):
    model = tiny_model("gpt2")
    quantize_model(model, BASES[method], 32)
    assert isinstance(model.transformer.h[0].attn.c_attn, NFkLinear)
    assert weight_report(model).bits_per_quantized_weight < int(method[2:]) + 0.5


def test_quantize_verb_writes_a_model_every_verb_loads(model_dir, tmp_path, capsys):
    out = tmp_path / "nf3"
    args = ["quantize", "--model", str(model_dir), "--method", "nf3", "--quant-block", "32"]
    assert main([*args, "-o", str(out)]) == 0
    assert "bits per quantised weight" in capsys.readouterr().out
    loaded = load_model(str(out))
    reference = load_model(str(model_dir), quantize="nf3", quant_block=32)
    tokens = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens).logits, reference.model(tokens).logits)
    assert main(["info", "--model", str(out)]) == 0
    assert "bits/weight" in capsys.readouterr().out
    run = tmp_path / "run"
    train = ["train", "--model", str(out), "--data", "task:reverse_words", "--train-examples", "8"]
    steps = ["--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0"]
    assert main([*train, *steps, "--output-dir", str(run), "--r", "2"]) == 0
    generate = ["generate", "--model", str(out), "--adapter", str(run), "--max-new-tokens", "2"]
    assert main([*generate, "w1 w2"]) == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_loftq_error_is_below_plain_quantisation_error(bits):
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(bits))
    plain = dequantize_weight(quantize_weight(weight, bits, 64), bits, (96, 128))
    state, a, b = loftq_layer(weight, bits, 64, rank=8, steps=5)
    q = dequantize_weight(state, bits, (96, 128))
    assert (weight - q - b @ a).norm() < 0.95 * (weight - plain).norm()


def test_loftq_verb_writes_its_low_rank_part_as_an_adapter(model_dir, tmp_path):
    out = tmp_path / "loftq"
    args = ["quantize", "--model", str(model_dir), "--method", "loftq", "--quant-block", "32"]
    assert main([*args, "--bits", "2", "--rank", "4", "--iters", "3", "-o", str(out)]) == 0
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    dense = tiny_llama()(tokens).logits
    plain = load_model(str(model_dir), quantize="nf2", quant_block=32).model
    loftq = load_model(str(out)).model
    load_adapter(loftq, out / "adapter")
    with torch.no_grad():
        plain_gap = (plain(tokens).logits - dense).norm()
        loftq_gap = (loftq(tokens).logits - dense).norm()
    assert loftq_gap < plain_gap


def test_a_fine_tune_starts_from_the_loftq_adapter(model_dir, tmp_path):
    out, data = tmp_path / "loftq", tmp_path / "data.jsonl"
    args = ["quantize", "--model", str(model_dir), "--method", "loftq", "--quant-block", "32"]
    assert main([*args, "--bits", "3", "--rank", "4", "--iters", "2", "-o", str(out)]) == 0
    data.write_text("".join(f'{{"prompt": "w{i} w5", "completion": "w7"}}\n' for i in range(8)))
    run = tmp_path / "run"
    train_args = ["train", "--model", str(out), "--data", str(data), "--output-dir", str(run)]
    steps = ["--max-steps", "1", "--batch-size", "4", "--lr", "1e-12", "--seq-len", "16"]
    assert main([*train_args, *steps, "--init-adapter", str(out / "adapter")]) == 0
    start, trained = read_adapter(out / "adapter"), read_adapter(run)
    assert trained.factors.keys() == start.factors.keys()
    for module, (a, b) in start.factors.items():
        torch.testing.assert_close(trained.factors[module][0], a, rtol=0, atol=1e-6)
        torch.testing.assert_close(trained.factors[module][1], b, rtol=0, atol=1e-6)

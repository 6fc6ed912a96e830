"""Frozen bases through bitsandbytes (QLoRA): gradients, PEFT parity, refusals, info."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from architectures import ARCHITECTURES, tiny_model
from conftest import tiny_llama
from peft import PeftModel
from torch import nn

from rankwise import RankwiseError
from rankwise.adapters import LoraConfig, inject_adapter, merge_experts, save_adapter
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.cli import main
from rankwise.quantize import BASES, quantize_model, weight_report
from rankwise.quantize.bnb import make_4bit

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 32  # divides every width of the tiny models (hidden 32)


def grads(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    layer(x).pow(2).sum().backward()
    return [x.grad, layer.lora_A.grad, layer.lora_B.grad]


def test_train_eval_train_gives_the_dense_gradients():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    quantised = make_4bit(dense.weight, dense.bias, "nf4", BLOCK)
    assert quantised.support_avx512bf16_for_cpu is False
    reference = nn.Linear(64, 32)
    reference.weight.data.copy_(quantised.dequantized())
    reference.bias.data.copy_(dense.bias)
    layers = [LowRankExperts(base, [ExpertSpec(4, 8.0)]) for base in (quantised, reference)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_A.copy_(torch.randn(4, 64, generator=torch.Generator().manual_seed(1)))
            layer.lora_B.copy_(torch.randn(32, 4, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(5, 64)
    before = grads(layers[0], x)
    layers[0].eval()
    with torch.no_grad():
        layers[0](x)  # the forward after which plain Linear4bit loses its input gradient
    layers[0].train()
    for got, want in zip(grads(layers[0], x), grads(layers[1], x), strict=True):
        assert torch.allclose(got, want, atol=1e-4)
    for got, want in zip(before, grads(layers[1], x), strict=True):
        assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_on_nf4_base_trains_and_loads_in_peft(arch, tmp_path):
    model = tiny_model(arch)
    tokens = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    dense_logits = model(tokens).logits
    made = quantize_model(model, BASES["nf4"], BLOCK)
    assert made and all(m.support_avx512bf16_for_cpu is False for m in made.values())
    quantised_base = copy.deepcopy(model)
    base_logits = model(tokens).logits
    assert 0 < (base_logits - dense_logits).abs().max() < 0.5 * dense_logits.abs().max()
    layers = inject_adapter(model, LoraConfig(r=4, lora_alpha=8))
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())
    assert all(layer.lora_A.dtype == torch.float32 for layer in layers.values())
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
    model.eval()
    ours = model(tokens).logits
    save_adapter(model, tmp_path / "a", base_model=arch)
    peft = PeftModel.from_pretrained(quantised_base, tmp_path / "a").eval()
    with torch.no_grad():
        assert (peft(tokens).logits - ours).abs().max() < 1e-4
    assert (ours - base_logits).abs().max() > 1e-3


def test_merging_into_a_quantised_base_is_refused_in_one_line():
    model = tiny_model("llama")
    quantize_model(model, BASES["nf4"], BLOCK)
    inject_adapter(model, LoraConfig(r=2))
    with pytest.raises(RankwiseError, match="quantised .nf4. .*without --quantize") as err:
        merge_experts(model)
    assert "\n" not in str(err.value)


def test_a_block_size_that_does_not_divide_a_layer_names_it():
    with pytest.raises(RankwiseError, match="block size 48 does not divide .* 'model.layers.0"):
        quantize_model(tiny_model("llama"), BASES["nf4"], 48)


@pytest.mark.parametrize("method, bits", [("nf4", 4.13), ("fp4", 4.13), ("int8", 8.0)])
def test_weight_report_counts_bits_per_weight(method, bits):
    model = tiny_llama(hidden=256, layers=1)
    dense = weight_report(model)
    assert dense.bits_per_parameter == 32 and dense.quantized_weights == 0
    quantize_model(model, BASES[method], 64)
    report = weight_report(model)
    assert report.parameters == dense.parameters
    # each layer also stores bitsandbytes' code tables (1.1 KB): small layers pay more for them
    assert bits <= report.bits_per_quantized_weight < bits + 0.3
    assert report.weight_bytes < dense.weight_bytes


def test_int8_base_passes_gradients_to_its_input():
    model = tiny_model("qwen2")
    quantize_model(model, BASES["int8"])
    layers = inject_adapter(model, LoraConfig(r=2))
    model.train()
    model(torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    first = next(iter(layers.values()))
    assert first.lora_B.grad.abs().sum() > 0


def test_info_reports_bytes_and_bits(model_dir, capsys):
    args = ["info", "--model", str(model_dir), "--quantize", "nf4", "--quant-block", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bits/parameter" in out and "bits/weight" in out


def test_train_then_generate_on_a_quantised_base(model_dir, tmp_path, capsys):
    quant = ["--model", str(model_dir), "--quantize", "nf4", "--quant-block", "32"]
    out = tmp_path / "run"
    train = ["train", *quant, "--data", "task:reverse_words", "--train-examples", "8"]
    steps = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0"]
    assert main([*train, *steps, "--output-dir", str(out), "--r", "2"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    generate = ["generate", *quant, "--adapter", str(out), "--max-new-tokens", "2", "w1 w2"]
    assert main(generate) == 0


def test_missing_bitsandbytes_says_what_still_works(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "bitsandbytes", None
    )  # import fails as on a platform without it
    with pytest.raises(RankwiseError, match="needs bitsandbytes .* nf2, nf3, nf4 and nf8") as err:
        quantize_model(tiny_model("llama"), BASES["nf4"], BLOCK)
    assert "\n" not in str(err.value)
    quantize_model(tiny_model("llama"), BASES["nf3"], BLOCK)  # rankwise's own NF-k still works

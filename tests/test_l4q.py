"""L4Q: the quantised forward, straight-through gradients, training, and the export."""

from __future__ import annotations

import pytest
import torch
from architectures import tiny_model
from conftest import tiny_llama
from safetensors.torch import load_file
from torch import nn

from rankwise.adapters import LoraConfig, attach_adapters, inject_adapter, load_adapter
from rankwise.adapters.inject import expert_layers
from rankwise.adapters.l4q import L4Q
from rankwise.adapters.peft_format import read_adapter
from rankwise.adapters.policy import POLICY_STATE
from rankwise.architectures import dense_weight
from rankwise.cli import main
from rankwise.errors import RankwiseError
from rankwise.fed.config import FedConfig
from rankwise.models import load_model
from rankwise.quantize import weight_report
from rankwise.quantize.l4q import IntKLinear, L4QExport, export_l4q
from rankwise.quantize.storage import WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")


def l4q_model(arch: str = "llama", bits: int = 4) -> nn.Module:
    """A tiny model with L4Q on every linear layer and B moved off zero."""
    torch.manual_seed(0)
    model = tiny_model(arch)
    inject_adapter(model, LoraConfig(r=2, lora_alpha=4, l4q_bits=bits, l4q_group=16))
    with torch.no_grad():
        for layer in expert_layers(model).values():
            layer.lora_B.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("bits", [3, 4])
def test_forward_is_the_quantised_merged_weights_forward(bits):
    model = l4q_model(bits=bits)
    layer = next(iter(expert_layers(model).values()))
    policy = layer.policy
    weight = policy.quantized_weight(layer).detach()
    step, offset = (t.detach() for t in policy.grid())
    steps = (weight.view(weight.shape[0], step.shape[1], -1) - offset[..., None]) / step[..., None]
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # on the grid
    assert steps.min() >= -1e-3 and steps.max() <= 2**bits - 1 + 1e-3
    x = torch.randn(2, 5, layer.in_features)
    assert torch.allclose(layer(x), nn.functional.linear(x, weight, layer.base.bias), atol=1e-6)


def test_gradients_reach_the_factors_and_the_grid_straight_through():
    model = l4q_model()
    layer = next(iter(expert_layers(model).values()))
    policy = layer.policy
    x = torch.randn(3, layer.in_features)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    for p in (layer.lora_A, layer.lora_B, policy.gain, policy.shift):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # dL/dW' = (dL/dQ) on the values inside the grid, 0 outside (the clamp), round ignored
    with torch.no_grad():
        merged = layer.base.weight + layer.delta_weight()
        step, offset = policy.grid()
        v = (merged.view(merged.shape[0], step.shape[1], -1) - offset[..., None]) / step[..., None]
        v = v.view_as(merged)
        inside = (v > 0) & (v < 2**policy.bits - 1)
        grad_merged = (grad_y.T @ x) * inside
        s = layer.experts[0].scaling
    assert torch.allclose(layer.lora_B.grad, s * grad_merged @ layer.lora_A.T, atol=1e-5)
    assert torch.allclose(layer.lora_A.grad, s * layer.lora_B.T @ grad_merged, atol=1e-5)


def straight_through_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The L4Q layer's output by autograd alone: LSQ's round with an identity gradient."""
    step, offset = layer.policy.grid()
    merged = dense_weight(layer.base) + layer.delta_weight()
    place = (merged.view(merged.shape[0], step.shape[1], -1) - offset[..., None]) / step[..., None]
    v = place.clamp(0, 2**layer.policy.bits - 1)
    v = v + (v.round() - v).detach()
    quantized = (v * step[..., None] + offset[..., None]).view_as(merged)
    return nn.functional.linear(x, quantized, layer.base.bias)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_written_out_backward_equals_autograd_through_the_quantiser(arch):
    model = l4q_model(arch)
    for layer in list(expert_layers(model).values())[:3]:
        with torch.no_grad():  # a grid that clips some values, so both clamp branches are taken
            layer.policy.gain.uniform_(-0.3, 0.1)
            layer.policy.shift.uniform_(-0.5, 0.5)
        if layer.base.bias is not None:
            layer.base.bias.requires_grad_(True)
        x = torch.randn(2, 5, layer.in_features, requires_grad=True)
        grad_y = torch.randn(2, 5, layer.out_features)
        params = [x, layer.lora_A, layer.lora_B, layer.policy.gain, layer.policy.shift]
        params += [layer.base.bias] if layer.base.bias is not None else []
        got = torch.autograd.grad(layer(x), params, grad_y)
        want = torch.autograd.grad(straight_through_forward(layer, x), params, grad_y)
        torch.testing.assert_close(layer(x), straight_through_forward(layer, x))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_training_forward_keeps_no_weight_sized_tensor_for_the_backward():
    model = l4q_model()
    layer = next(iter(expert_layers(model).values()))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(3, layer.in_features))
    weight = dense_weight(layer.base)
    large = [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()]
    assert saved and not large  # autograd through the quantiser keeps three of them


def test_training_through_the_quantiser_lowers_the_loss():
    model = l4q_model(bits=3)
    params = [p for layer in expert_layers(model).values() for p in layer.adapter_params().values()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    tokens = torch.randint(3, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_has_no_lora_and_the_same_logits(arch, tmp_path):
    model = l4q_model(arch)
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        trained = model(tokens).logits
        export_l4q(model)
        exported = model(tokens).logits
    assert not expert_layers(model)
    layers = [m for m in model.modules() if isinstance(m, IntKLinear)]
    assert layers and all(m.scale.dtype == m.offset.dtype == torch.float16 for m in layers)
    assert weight_report(model).bits_per_quantized_weight == 4 + 32 / 16  # codes, half step, offset
    assert torch.allclose(exported, trained, atol=1e-5)


def test_train_then_quantize_writes_the_trained_model_without_lora(model_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "l4q"
    train = ["train", "--model", str(model_dir), "--data", "task:reverse_words"]
    steps = ["--train-examples", "8", "--max-steps", "3", "--batch-size", "2", "--seq-len", "32"]
    l4q = ["--l4q-bits", "3", "--l4q-group", "16", "--r", "2", "--lr", "1e-2"]
    assert main([*train, *steps, *l4q, "--eval-every", "0", "--output-dir", str(run)]) == 0
    args = ["quantize", "--model", str(model_dir), "--method", "l4q", "--adapter", str(run)]
    assert main([*args, "-o", str(out)]) == 0
    assert not any("lora" in key for key in load_file(out / WEIGHTS))
    with pytest.raises(RankwiseError, match="is an L4Q run"):  # its adapter alone would mislead
        load_adapter(tiny_llama(), run)
    # the trained model: the dense base, the run's factors and grids, the L4Q forward
    reference = tiny_llama()
    saved = load_file(run / POLICY_STATE)
    for name, layer in attach_adapters(reference, [read_adapter(run)]).items():
        layer.policy = L4Q(layer, 3, 16, name)
        for key, tensor in layer.policy.state().items():
            tensor.data.copy_(saved[f"{name}:{key}"])
    assert saved[f"{name}:lora_B"].abs().sum() > 0  # it trained
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    loaded = load_model(str(out)).model
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, reference(tokens).logits, atol=1e-5)


def test_l4q_refuses_what_it_cannot_merge():
    model = tiny_llama()
    with pytest.raises(RankwiseError, match="lora_dropout"):
        inject_adapter(model, LoraConfig(r=2, l4q_bits=4, l4q_group=16, lora_dropout=0.1))
    with pytest.raises(RankwiseError, match="does not divide"):
        inject_adapter(tiny_llama(), LoraConfig(r=2, l4q_bits=4, l4q_group=48))
    with pytest.raises(RankwiseError, match="neither use_dora"):
        LoraConfig(l4q_bits=4, use_dora=True)
    with pytest.raises(RankwiseError, match="l4q_bits is not supported"):
        FedConfig(l4q_bits=4)  # clients exchange factors only, not the grids
    with pytest.raises(RankwiseError, match="was it trained with l4q_bits"):
        L4QExport(adapter="no-such-run").quantize(tiny_llama(), 32)

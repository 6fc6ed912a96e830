"""Quantising a model's frozen linear maps in place, and counting what its weights take.

Every linear map adapters can target is quantised (``nn.Linear`` and GPT-2's ``Conv1D``, whose
[in, out] weight is transposed first, so the quantised layer is an ordinary [out, in] map); the
output head and the embeddings stay in the model's dtype, as in QLoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.inject import adaptable_modules, swap_modules
from rankwise.architectures import QuantizedLinear, dense_weight, linear_shape
from rankwise.errors import RankwiseError

# (weight [out, in], bias, bits or kind, block) -> a frozen quantised layer
Maker = Callable[[torch.Tensor, torch.Tensor | None, object, int], nn.Module]


@dataclass(frozen=True)
class BaseQuantizer:
    """One ``--quantize`` choice: how a layer is made, and whether blocks cut its rows."""

    make: Maker
    kind: object  # bitsandbytes' quant_type, or the bit width of NF-k
    blockwise: bool = True


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """The dense linear maps of ``model`` that ``quantize_model`` would replace, by name."""
    return {n: m for n, m in adaptable_modules(model).items() if not isinstance(m, QuantizedLinear)}


def check_blocks(modules: dict[str, nn.Module], block: int, bits: int = 8) -> None:
    """One line naming the first layer whose rows ``block`` (or byte packing) does not divide."""
    for name, module in modules.items():
        fan_in, _ = linear_shape(module)
        if fan_in % block:
            raise RankwiseError(
                f"block size {block} does not divide the input width {fan_in} of '{name}': "
                f"choose a divisor of {fan_in} (64 or 32 for SmolLM2's 576)"
            )
        if block * bits % 8:
            raise RankwiseError(f"block size {block} x {bits} bits does not fill whole bytes")


@torch.no_grad()
def quantize_model(
    model: nn.Module, quantizer: BaseQuantizer, block: int = 64
) -> dict[str, nn.Module]:
    """Replace every dense linear map (not the head) by its quantised form; returns the new ones.

    Layers are quantised one at a time on their own device, so the dense copy of only one layer
    exists beside the model at any moment.
    """
    modules = quantizable(model)
    if not modules:
        raise RankwiseError(f"{type(model).__name__} has no linear layers to quantise")
    if quantizer.blockwise:
        check_blocks(modules, block, quantizer.kind if isinstance(quantizer.kind, int) else 8)
    made = {}
    for name, module in modules.items():
        weight = dense_weight(module).contiguous()  # [out, in] for either layout
        made[name] = quantizer.make(weight, module.bias, quantizer.kind, block)
        swap_modules(model, {name: made[name]})
    return made


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear map computes with, [out, in] float32 (dequantised if quantised)."""
    if isinstance(module, QuantizedLinear):
        return module.dequantized()
    return dense_weight(module).float()


@dataclass(frozen=True)
class WeightReport:
    """Bytes of a model's weights and parameters counted as dense values."""

    weight_bytes: int
    parameters: int
    quantized_bytes: int
    quantized_weights: int

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.weight_bytes / self.parameters

    @property
    def bits_per_quantized_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)


def weight_report(model: nn.Module) -> WeightReport:
    """What the weights take: quantised layers by their storage, the rest by dtype (ties once)."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    packed = {id(m.weight) for m in quantized.values()}
    q_bytes = sum(m.storage_bytes() for m in quantized.values())
    q_weights = sum(m.in_features * m.out_features for m in quantized.values())
    dense = [p for p in model.parameters() if id(p) not in packed]
    nbytes = q_bytes + sum(p.numel() * p.element_size() for p in dense)
    return WeightReport(nbytes, q_weights + sum(p.numel() for p in dense), q_bytes, q_weights)

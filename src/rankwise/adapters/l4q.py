"""L4Q (arXiv 2402.04902): quantisation-aware LoRA, a policy of the experts layer.

    y = Q(W + s B A) x + b,    Q(V) = a * round(clamp((V - c) / a, 0, 2^k - 1)) + c

per group of ``group`` consecutive inputs of a row, with the step a and offset c trained with
the LoRA (LSQ, arXiv 1902.08153, with an offset as in LSQ+): rounding passes gradients straight
through, the clamp does not, so V's gradient reaches B and A only for values inside the grid,
a's is round(v) - v inside and the grid's end outside, c's is 0 inside and 1 outside (written
out in ``QuantizedLowRank``'s backward; a test checks them against autograd). After training,
the merged weight *is* the quantised matrix: ``merge`` writes Q(W + s B A) into the base and
the export (``rankwise quantize --method l4q``) stores its integer codes and (a, c): no LoRA
branch at inference.

Choices the paper leaves open, made here: a and c start from each group's min and max of W (a0 =
(max - min) / (2^k - 1), c0 = min), so the first forward is W's round-to-nearest quantisation;
they train as a = a0 (1 + gain), c = c0 + a0 shift with gain and shift from 0, so that Adam
(which moves every parameter by about the learning rate) moves each group's grid by a share of
its own step at the LoRA's learning rate, where a raw step of 0.01 would lose 10% a step at lr
1e-3 (this stands in for LSQ's gradient scale 1/sqrt(N Q_p), made for SGD); a and c are float16
values throughout training (rounded straight through), as the export stores them (K + 32/group
bits a weight, as integer formats with half-precision scales do), so the export is exact; the
training forward is one autograd function (``QuantizedLowRank``) that keeps only x, W, A, B and
the grid and forms Q(W + s B A) again in its backward, as the paper's memory-saving backward
does, where autograd through the quantiser would hold three [out, in] tensors per layer until the
backward; it replaces the base's product (``replaces_base``). Dropout on the adapter's input
cannot act on a merged weight, so it is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from rankwise.adapters.layer import LowRankExperts
from rankwise.adapters.policy import POLICY_STATE, Policy
from rankwise.architectures import QuantizedLinear, dense_weight
from rankwise.errors import RankwiseError

HALF_TINY = torch.finfo(torch.float16).tiny  # the least step float16 holds at full precision


def to_half_grid(value: torch.Tensor) -> torch.Tensor:
    """``value`` rounded to float16's values (kept in its dtype), gradients straight through."""
    return value + (value.to(torch.float16).to(value.dtype) - value).detach()


def on_grid(
    weight: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q(weight) [out, in] on each group's grid offset + step * {0 .. 2^bits - 1}, with each
    value's place on it (unclamped) and its code, both (out, groups, group); ``step`` and
    ``offset`` are (out, groups)."""
    grouped = weight.view(weight.shape[0], step.shape[1], -1)
    place = (grouped - offset[..., None]) / step[..., None]
    codes = place.clamp(0, 2**bits - 1).round()
    return (codes * step[..., None] + offset[..., None]).view(weight.shape), place, codes


class QuantizedLowRank(torch.autograd.Function):
    """y = x Q(W + B A)^T + bias with LSQ's gradients written out: rounding straight through,
    the clamp stopping them, so that no [out, in] tensor is kept between forward and backward
    (Q is formed again there)."""

    @staticmethod
    def forward(ctx, x, weight, lora_b, lora_a, step, offset, bits, bias):
        ctx.save_for_backward(x, weight, lora_b, lora_a, step, offset)
        ctx.bits = bits
        merged = weight.to(lora_a.dtype) + lora_b @ lora_a
        quantized = on_grid(merged, step, offset, bits)[0]
        return nn.functional.linear(x, quantized.to(x.dtype), None if bias is None else bias.to(x))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_b, lora_a, step, offset = ctx.saved_tensors
        merged = weight.to(lora_a.dtype) + lora_b @ lora_a
        quantized, place, codes = on_grid(merged, step, offset, ctx.bits)
        inside = (place >= 0) & (place <= 2**ctx.bits - 1)  # torch.clamp's gradient rule
        grad_x = grad_out @ quantized.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        flat_grad, flat_x = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_q = (flat_grad.t() @ flat_x).to(lora_a.dtype).view(place.shape)  # dL/dQ, grouped
        grad_step = (grad_q * torch.where(inside, codes - place, codes)).sum(2)
        grad_offset = (grad_q * ~inside).sum(2)
        grad_merged = (grad_q * inside).view(merged.shape)
        grad_b, grad_a = grad_merged @ lora_a.t(), lora_b.t() @ grad_merged
        grad_bias = flat_grad.sum(0) if ctx.needs_input_grad[7] else None
        return grad_x, None, grad_b, grad_a, grad_step, grad_offset, None, grad_bias


class L4Q(Policy):
    """One expert merged into W and quantised with a trained step and offset per group."""

    replaces_base = True

    def __init__(self, layer: LowRankExperts, bits: int, group: int, name: str = "layer"):
        super().__init__()
        if layer.num_experts != 1:
            raise RankwiseError("L4Q adapts a layer with one expert, not a stack of them")
        if isinstance(layer.base, QuantizedLinear):
            raise RankwiseError(
                "L4Q trains from the full-precision weight: load the model without --quantize"
            )
        if not isinstance(layer.dropout_runs[0], nn.Identity):
            raise RankwiseError("L4Q quantises W + s B A as one matrix: set lora_dropout to 0")
        weight = dense_weight(layer.base).detach().to(layer.lora_A)  # (out, in)
        if weight.shape[1] % group:
            raise RankwiseError(
                f"l4q group {group} does not divide the input width {weight.shape[1]} of '{name}'"
            )
        grouped = weight.view(weight.shape[0], -1, group)  # (out, groups, group)
        low, high = grouped.amin(2), grouped.amax(2)
        self.bits = bits
        # the layer's factors, unregistered here, so that ``state`` restores them on resume
        self.factors = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
        step = ((high - low) / (2**bits - 1)).clamp_min(HALF_TINY)  # (out, groups)
        self.register_buffer("initial_step", step, persistent=False)  # saved by ``state``
        self.register_buffer("initial_offset", low.clone(), persistent=False)
        # a = a0 (1 + gain), c = c0 + a0 shift: Adam moves each group by a share of its step
        self.gain = nn.Parameter(torch.zeros_like(step))
        self.shift = nn.Parameter(torch.zeros_like(step))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"l4q_step_gain": self.gain, "l4q_offset_shift": self.shift}

    def state(self) -> dict[str, torch.Tensor]:
        """Everything the export needs beside the PEFT adapter: the factors, the grid and its
        width (the trainer restores a layer whose policy has state from this alone)."""
        grid = {"l4q_initial_step": self.initial_step, "l4q_initial_offset": self.initial_offset}
        width = {"l4q_bits": torch.tensor(self.bits)}
        return {**self.factors, **self.adapter_params(), **grid, **width}

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step a, offset c) of every group, (out, groups) each, differentiable, and float16
        values (the export stores them so) with a straight-through gradient."""
        step = (self.initial_step * (1 + self.gain).clamp_min(1e-3)).clamp_min(HALF_TINY)
        return to_half_grid(step), to_half_grid(
            self.initial_offset + self.initial_step * self.shift
        )

    @torch.no_grad()
    def quantization(self, layer: LowRankExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """Q(W + s B A) [out, in] and its integer codes (uint8, [out, in]); training's forward
        forms Q inside ``QuantizedLowRank`` instead."""
        weight = dense_weight(layer.base).to(layer.lora_A.dtype)
        quantized, _, codes = on_grid(weight + layer.delta_weight(), *self.grid(), self.bits)
        return quantized, codes.to(torch.uint8).view(quantized.shape)

    def quantized_weight(self, layer: LowRankExperts) -> torch.Tensor:
        """Q(W + s B A) [out, in]."""
        return self.quantization(layer)[0]

    def forward(
        self,
        layer: LowRankExperts,
        x: torch.Tensor,
        gates: torch.Tensor | None,
        into: torch.Tensor | None,
    ) -> torch.Tensor:
        bias = layer.base.bias
        if torch.is_grad_enabled():
            scaled_b = layer.lora_B * layer.rank_gate(None)
            weight = dense_weight(layer.base)
            return QuantizedLowRank.apply(
                x, weight, scaled_b, layer.lora_A, *self.grid(), self.bits, bias
            )
        weight = self.held("weight", lambda: self.quantized_weight(layer), *self.sources(layer))
        return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x))

    def sources(self, layer: LowRankExperts) -> tuple[torch.Tensor, ...]:
        grid = (self.gain, self.shift, self.initial_step, self.initial_offset)
        return dense_weight(layer.base), layer.lora_A, layer.lora_B, *grid

    def merge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        """W <- Q(W + s B A): the base becomes the quantised matrix itself."""
        weight.copy_(self.quantized_weight(layer).to(weight.dtype))

    def unmerge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        raise RankwiseError("L4Q's merge rounds W + s B A onto its grid: reload the base to undo")


def check_not_l4q(folder: str | os.PathLike) -> None:
    """Refuse an L4Q run read as a plain adapter: without its quantiser it is another model."""
    state = Path(folder) / POLICY_STATE
    if not state.is_file():
        return
    with safe_open(str(state), "pt") as saved:
        if any(key.endswith(":l4q_bits") for key in saved.keys()):
            raise RankwiseError(
                f"'{folder}' is an L4Q run, whose adapter alone is not the trained model: export "
                f"it (rankwise quantize --method l4q --adapter {folder} -o OUT) and use --model OUT"
            )

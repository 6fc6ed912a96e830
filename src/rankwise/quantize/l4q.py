"""L4Q's export (arXiv 2402.04902): a trained L4Q adapter folded into linearly quantised layers.

Training (``rankwise train --l4q-bits K``, the policy in ``adapters/l4q.py``) computes with Q(W
+ s B A) on a grid offset + step * {0 .. 2^K - 1} per group; here that matrix is stored as what
it is: K-bit integer codes (packed as NF-k's are) and the float16 step and offset of each group
(training rounds them to float16 too), in ``IntKLinear``. The model written has no LoRA branch
and gives the trained model's logits (a test).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rankwise.adapters.attach import attach_adapters
from rankwise.adapters.inject import expert_layers, swap_modules
from rankwise.adapters.l4q import L4Q
from rankwise.adapters.peft_format import read_adapter
from rankwise.adapters.policy import POLICY_STATE
from rankwise.architectures import QuantizedLinear
from rankwise.errors import RankwiseError
from rankwise.options import option
from rankwise.quantize.method import Factors, QuantizeMethod
from rankwise.quantize.nfk import pack, unpack


class IntKLinear(QuantizedLinear):
    """A frozen linear map stored as K-bit codes with a float16 step and offset per group."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group: int,
        bias: bool,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block, self.method = bits, group, f"int{bits}"
        groups = in_features // group
        packed = out_features * in_features * bits // 8
        self.register_buffer("weight", torch.zeros(packed, dtype=torch.uint8, device=device))
        half = {"dtype": torch.float16, "device": device}
        self.register_buffer("scale", torch.zeros(out_features, groups, **half))
        self.register_buffer("offset", torch.zeros(out_features, groups, **half))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), False) if bias else None

    def dequantized(self) -> torch.Tensor:
        count = self.out_features * self.in_features
        codes = unpack(self.weight, self.bits, count).view(self.out_features, -1, self.block)
        scale, offset = self.scale.float()[..., None], self.offset.float()[..., None]
        values = codes * scale + offset  # (out, groups, group), in float32 as training formed it
        return values.view(self.out_features, self.in_features)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.block}"
        )


@torch.no_grad()
def export_l4q(model: nn.Module) -> list[str]:
    """Replace every L4Q-adapted layer of ``model`` by the ``IntKLinear`` of Q(W + s B A)."""
    made = {}
    for name, layer in expert_layers(model).items():
        policy = layer.policy
        if not isinstance(policy, L4Q):
            raise RankwiseError(f"'{name}' is not adapted by L4Q: only L4Q layers export")
        weight, codes = policy.quantization(layer)  # (out, in), exactly on the grid
        out_features, in_features = weight.shape
        step, offset = policy.grid()
        group = in_features // step.shape[1]
        bias = layer.base.bias
        made[name] = IntKLinear(
            in_features, out_features, policy.bits, group, bias is not None, weight.device
        )
        made[name].weight.copy_(pack(codes.flatten(), policy.bits))
        made[name].scale.copy_(step)
        made[name].offset.copy_(offset)
        if bias is not None:
            made[name].bias.copy_(bias)
    swap_modules(model, made)
    return list(made)


@dataclass
class L4QExport(QuantizeMethod):
    """L4Q: write a run's trained L4Q adapter as the quantised matrices it trained to."""

    name = "l4q"
    adapter: str = option("", "the L4Q training run's folder (rankwise train --l4q-bits K)")

    def check(self) -> None:
        super().check()
        if not self.adapter:
            raise RankwiseError("l4q exports a trained run: give its folder (--adapter)")

    @torch.no_grad()
    def quantize(
        self, model: nn.Module, block: int, input_ids: torch.Tensor | None = None
    ) -> Factors:
        folder = Path(self.adapter)
        if not (folder / POLICY_STATE).is_file():
            raise RankwiseError(
                f"'{folder}' holds no {POLICY_STATE}: was it trained with l4q_bits?"
            )
        saved = load_file(folder / POLICY_STATE)
        layers = attach_adapters(model, [read_adapter(folder)])
        for name, layer in layers.items():
            if f"{name}:l4q_initial_step" not in saved:
                raise RankwiseError(f"'{folder}' has no L4Q grid for '{name}'")
            group = layer.in_features // saved[f"{name}:l4q_initial_step"].shape[1]
            layer.policy = L4Q(layer, int(saved[f"{name}:l4q_bits"]), group, name)
            for key, tensor in layer.policy.state().items():
                tensor.copy_(saved[f"{name}:{key}"])
        export_l4q(model)
        return {}

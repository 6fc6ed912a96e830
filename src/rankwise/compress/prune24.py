"""2:4 magnitude pruning: in every group of 4 consecutive inputs of a row, keep the 2 largest.

The semi-structured sparsity GPUs run at twice the dense rate (the pattern EoRA compensates in
its sparse experiments, arXiv 2410.21271). No data is needed and the model keeps its dense
shapes (zeros stay stored), so the ratio is exactly 0.5 of every decoder linear layer's weights.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from rankwise.architectures import dense_weight, linear_shape
from rankwise.compress.base import Compressor, decoder_layers, layer_linears
from rankwise.compress.calibration import Statistics
from rankwise.errors import RankwiseError

GROUP, KEEP = 4, 2


def prune_2_4(weight: torch.Tensor) -> None:
    """Zero, in place, the 2 smallest-magnitude of every 4 consecutive entries of each row."""
    groups = weight.view(weight.shape[0], -1, GROUP)  # (out, in / 4, 4)
    smallest = groups.abs().topk(GROUP - KEEP, dim=-1, largest=False).indices
    groups.scatter_(-1, smallest, 0.0)


@dataclasses.dataclass
class Prune24(Compressor):
    """2:4 semi-structured magnitude pruning of every decoder linear layer (--ratio 0.5)."""

    name: ClassVar[str] = "prune24"
    fixed_ratio: ClassVar[float | None] = 0.5

    def check_model(self, model: nn.Module) -> None:
        _, layers = decoder_layers(model)
        for name, linear in layer_linears(layers[0]).items():
            if linear_shape(linear)[0] % GROUP:
                raise RankwiseError(f"2:4 pruning needs input widths divisible by 4: '{name}'")

    def needs(self, model: nn.Module) -> dict[str, set[str]]:
        return {}

    @torch.no_grad()
    def compress_layer(self, model: nn.Module, index: int, ratio: float, stats: Statistics) -> None:
        _, layers = decoder_layers(model)
        for linear in layer_linears(layers[index]).values():
            weight = dense_weight(linear)
            pruned = weight.contiguous()
            prune_2_4(pruned)
            weight.copy_(pruned)

"""FlyLoRA (arXiv 2510.08396): an implicit rank-wise mixture with a frozen sparse random A.

A [R, in] is a sparse random projection (k / R of each row non-zero), drawn once and never
trained, like the fly olfactory circuit's projection. The router is A x itself:
the top-k ranks of A x plus a balancing bias are active, so only those columns of B get a
gradient. There are no router parameters; the bias moves only during training, as in SMoRA,
once per optimizer step from that step's usage (the official code moves it at every forward,
evaluation included).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.routers.base import equal_experts
from rankwise.routers.smora import BalancedRanks, RankOptions


def sparse_projection(
    rows: int, cols: int, density: float, generator: torch.Generator
) -> torch.Tensor:
    """A random [rows, cols] matrix with round(density * cols) entries N(0, 1/rows^2) per row.

    As the official code (github.com/gfyddha/FlyLoRA, init "sparse"): the same count per row.
    """
    keep = max(1, round(density * cols))
    order = torch.rand(rows, cols, generator=generator).argsort(dim=-1)[:, :keep]  # (rows, keep)
    mask = torch.zeros(rows, cols).scatter(-1, order, 1.0)
    return torch.randn(rows, cols, generator=generator) / rows * mask


@dataclass
class FlyLoRAOptions(RankOptions):
    """FlyLoRA's settings (lora_alpha: scaling alpha / rank, as the official code)."""


class FlyLoRA(BalancedRanks):
    """Top-k of A x (+ bias) picks the ranks; B is trained, A stays frozen."""

    name = "flylora"
    options = FlyLoRAOptions

    @classmethod
    def layer_specs(cls, model: nn.Module, options: RankOptions) -> dict[str, list[ExpertSpec]]:
        scaled = replace(options, lora_alpha=options.lora_alpha / options.rank)  # as official
        return equal_experts(model, scaled, 1, options.rank)

    def __init__(self, layer: LowRankExperts, options: RankOptions, index: int):
        super().__init__(layer, options, index)
        generator = torch.Generator().manual_seed(torch.initial_seed() + index)
        with torch.no_grad():
            a = sparse_projection(*layer.lora_A.shape, options.top_k / options.rank, generator)
            layer.lora_A.copy_(a)  # drawn on the CPU (reproducible anywhere), copied to the device

    def trainable(self, layer: LowRankExperts) -> list[torch.nn.Parameter]:
        return [layer.lora_B]

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        (h,) = self.read(layer, x)  # (tokens, R), fp32
        chosen = (h.detach() + self.bias).topk(self.k, dim=-1).indices
        mask = h.new_zeros(h.shape).scatter(-1, chosen, 1.0)
        self.count(chosen)
        self.keep_gates(mask, x)
        return layer.up(h, mask * layer.rank_scaling, into)

"""A dense softmax gate: y = W x + sum_e w_e(x) s_e B_e A_e x with w = softmax(W_g x).

The weighted-sum gate that RadarGate (arXiv 2505.23184) argues cannot scale: its output stays
in the convex cone of the experts' outputs. It is RadarGate with every angle at zero, and the
baseline (a) of bench/mixtures.py's scaling sweep: the same experts, every one used per token,
no rotation. (MoLA with ``top_k: 0`` computes the same sum; this router is the one without
MoLA's depth pattern and balancing loss, named for what it is.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.options import option
from rankwise.routers.base import ExpertOptions, Router, equal_experts


@dataclass
class SoftmaxOptions(ExpertOptions):
    """The softmax gate's settings: E experts of one rank per module, all used per token."""

    expert_rank: int = option(
        8, "rank of each expert (scaling lora_alpha / expert_rank)", within="[1, inf)"
    )
    num_experts: int = option(4, "experts per module", within="[1, inf)")


class Softmax(Router):
    """A linear gate per module and the softmax-weighted sum of all its experts."""

    name = "softmax"
    options = SoftmaxOptions

    @classmethod
    def layer_specs(cls, model: nn.Module, options: SoftmaxOptions) -> dict[str, list[ExpertSpec]]:
        return equal_experts(model, options, options.expert_rank, options.num_experts)

    def __init__(self, layer: LowRankExperts, options: SoftmaxOptions, index: int):
        super().__init__()
        self.gate = nn.Linear(layer.in_features, layer.num_experts, bias=False).to(layer.lora_A)

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        h, logits = self.read(layer, x, self.gate)  # (tokens, R), (tokens, E)
        weights = torch.softmax(logits, dim=-1)
        self.keep_gates(weights, x)
        return layer.up(h, layer.rank_gate(weights), into)

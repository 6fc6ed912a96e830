"""SMoRA (arXiv 2501.15103): the ranks of one LoRA are its experts, a few active per token.

One LoRA of rank R is stored as R rank-1 experts. A linear router gives sigmoid gates per rank;
the top-k ranks by gate plus a non-trained bias are active, weighted by their gates normalised
to sum 1. As in the official code (github.com/StyxXuan/smora), the k active ranks then act as a
LoRA of rank k: scaling alpha / k, each rank weighted by k times its normalised gate (mean 1),
so the chosen ranks' weights sum to alpha whatever R is (stored as scaling alpha per rank).
Instead of an auxiliary loss, the bias moves after each optimizer step by ``bias_rate`` toward
balanced use: up for ranks used less than average, down for the others (the loss-free
balancing of DeepSeek-V3, arXiv 2412.19437).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.init import INIT_SCHEMES
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.errors import RankwiseError
from rankwise.options import option
from rankwise.routers.base import ExpertOptions, Router, dense_gates, equal_experts


@dataclass
class RankOptions(ExpertOptions):
    """Settings of routers whose experts are the ranks of one LoRA (SMoRA, FlyLoRA)."""

    rank: int = option(8, "rank R of the one LoRA: its R rank-1 experts", within="[1, inf)")
    top_k: int = option(2, "ranks active per token (1 <= top_k <= rank)", within="[1, inf)")
    bias_rate: float = option(
        1e-3, "step of the balancing bias after each optimizer step", within="[0, inf)"
    )

    def check(self) -> None:
        super().check()
        if self.top_k > self.rank:
            raise RankwiseError(f"needs 1 <= top_k <= rank, got top_k={self.top_k} > {self.rank}")


@dataclass
class SMoRAOptions(RankOptions):
    """SMoRA's settings (lora_alpha: the k active ranks act as a rank-k LoRA, alpha / k)."""


class BalancedRanks(Router):
    """Shared bookkeeping of rank routers: a selection bias nudged toward balanced use."""

    def __init__(self, layer: LowRankExperts, options: RankOptions, index: int):
        super().__init__()
        rank = layer.lora_A.shape[0]
        self.k = options.top_k
        self.rate = options.bias_rate
        self.register_buffer("bias", layer.lora_A.new_zeros(rank))
        self.register_buffer("load", layer.lora_A.new_zeros(rank), persistent=False)

    @classmethod
    def initialise(
        cls, model: nn.Module, layers: dict[str, LowRankExperts], options: RankOptions
    ) -> None:
        """Initialise the R rank-1 experts as one rank-R LoRA (fan-ins and scales of rank R)."""
        with torch.no_grad():
            for layer in layers.values():
                INIT_SCHEMES[options.init](layer.lora_A, layer.lora_B)

    def count(self, chosen: torch.Tensor) -> None:
        """Add the ranks chosen in a training forward to the load of this step."""
        if self.training:
            self.load += torch.bincount(chosen.reshape(-1), minlength=self.load.numel())

    def step_counts(self) -> list[torch.Tensor]:
        return [self.load]

    @torch.no_grad()
    def after_step(self) -> None:
        """bias += rate * sign(mean load - load); the load restarts at zero."""
        if self.load.sum() > 0:
            self.bias += self.rate * torch.sign(self.load.mean() - self.load).to(self.bias)
        self.load.zero_()


class SMoRA(BalancedRanks):
    """Sigmoid gates per rank, top-k by gate + bias, gates renormalised over the chosen ranks."""

    name = "smora"
    options = SMoRAOptions

    @classmethod
    def layer_specs(cls, model: nn.Module, options: RankOptions) -> dict[str, list[ExpertSpec]]:
        """Scaling alpha per rank: alpha / k of a rank-k LoRA times k ĝ (mean 1 when chosen).

        An ``ExpertSpec`` of rank 1 and alpha a has scaling a, so alpha is stored as is.
        """
        return equal_experts(model, options, 1, options.rank)

    def __init__(self, layer: LowRankExperts, options: RankOptions, index: int):
        super().__init__(layer, options, index)
        self.gate = nn.Linear(layer.in_features, layer.lora_A.shape[0], bias=False)
        self.gate.to(layer.lora_A)

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        h, logits = self.read(layer, x, self.gate)  # (tokens, R) each
        scores = torch.sigmoid(logits)
        chosen = (scores + self.bias).topk(self.k, dim=-1).indices  # bias only picks ranks
        picked = scores.gather(-1, chosen)
        weights = dense_gates(picked / picked.sum(-1, keepdim=True), chosen, scores.shape[-1])
        self.count(chosen)
        self.keep_gates(weights, x)
        return layer.up(h, weights * layer.rank_scaling, into)

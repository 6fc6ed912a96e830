"""MoLA (arXiv 2402.08562): more LoRA experts in higher layers, each module with its own router.

Every targeted module of block l holds E_l experts of rank r and a linear router; a token uses
the top-k (k = 2 in the paper) of the softmax, renormalised, and only those experts run. The
counts E_l come from ``expert_pattern`` over equal groups of depth ("2,4,6,8" is the paper's
MoLA-▽, its best: fewer experts low, more high, over four quarters), or ``num_experts``
everywhere. An optional Switch-style load-balancing loss (Fedus et al., arXiv 2101.03961) per
decoder block, pooled over the block's routers as in the official code, is weighted by
``aux_coef`` (the official instruction-tuning script uses 0.001).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.architectures import block_index, decoder_blocks
from rankwise.errors import RankwiseError
from rankwise.options import option
from rankwise.routers.base import (
    ExpertOptions,
    Router,
    dense_gates,
    equal_experts,
    grouped,
    routed_sum,
    top_k_softmax,
)


def pattern_counts(pattern: str, num_blocks: int) -> list[int]:
    """Experts per block: the pattern's counts spread over equal groups of blocks."""
    counts = [int(c) for c in pattern.split(",")]
    return [counts[block * len(counts) // num_blocks] for block in range(num_blocks)]


@dataclass
class MoLAOptions(ExpertOptions):
    """MoLA's settings: E experts of one rank per module, top-k of a softmax router."""

    expert_rank: int = option(
        8, "rank of each expert (scaling lora_alpha / expert_rank)", within="[1, inf)"
    )
    num_experts: int = option(
        4, "experts per module (unless expert_pattern is set)", within="[1, inf)"
    )
    expert_pattern: str | int = option(
        "", "experts per module over equal depth groups, low to high, e.g. 2,4,6,8 (MoLA-▽)"
    )
    top_k: int = option(2, "experts used per token (0: all)", within="[0, inf)")
    aux_coef: float = option(
        0.0, "weight of the Switch load-balancing loss (the paper uses 0.001)", within="[0, inf)"
    )

    def check(self) -> None:
        super().check()
        self.expert_pattern = str(self.expert_pattern)  # YAML reads a single count as an int
        if self.expert_pattern and not all(
            c.strip().isdigit() and int(c) > 0 for c in self.expert_pattern.split(",")
        ):
            raise RankwiseError("expert_pattern must be positive counts like 2,4,6,8")


class MoLA(Router):
    """Softmax router per module, top-k renormalised gates, sparse expert dispatch."""

    name = "mola"
    options = MoLAOptions

    def __init__(self, layer: LowRankExperts, options: MoLAOptions, index: int):
        super().__init__()
        self.gate = nn.Linear(layer.in_features, layer.num_experts, bias=False)
        self.gate.to(layer.lora_A)
        self.k = min(options.top_k or layer.num_experts, layer.num_experts)
        self.aux_coef = options.aux_coef
        self.last_probs = torch.zeros(0, layer.num_experts)  # (..., E) with grad, for aux_loss

    @classmethod
    def layer_specs(cls, model: nn.Module, options: MoLAOptions) -> dict[str, list[ExpertSpec]]:
        specs = equal_experts(model, options, options.expert_rank, options.num_experts)
        if not options.expert_pattern:
            return specs
        counts = pattern_counts(options.expert_pattern, len(decoder_blocks(model)[1]))
        return {name: experts[:1] * counts[block_index(name)] for name, experts in specs.items()}

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        dense = not grouped(layer, self.k, x.numel() // x.shape[-1])
        h, logits = self.read(layer, x, self.gate, down=dense)  # (tokens, R), (tokens, E)
        weights, chosen = top_k_softmax(logits, self.k)  # (tokens, k)
        if self.training and self.aux_coef:
            self.last_probs = torch.softmax(logits, dim=-1)
        gates = dense_gates(weights, chosen, layer.num_experts)
        self.keep_gates(gates, x)
        return routed_sum(layer, x, gates, chosen, into, h)

    @classmethod
    def aux_loss(cls, routers: dict[str, Router]) -> torch.Tensor | None:
        """Switch loss E * sum_e f_e P_e per decoder block, summed over blocks, times aux_coef.

        As the official code, the routers of one block are pooled: f_e is the share of the
        block's routed slots (all its modules' tokens, top-k each) that go to expert e and P_e
        its mean router probability over the same tokens.
        """
        blocks: dict[int, list[MoLA]] = defaultdict(list)
        for name, router in routers.items():
            blocks[block_index(name)].append(router)
        terms = []
        for group in blocks.values():
            first = group[0]
            if first.aux_coef == 0 or first.last_gates is None:
                continue
            num = first.last_probs.shape[-1]
            share = torch.stack(
                [(r.last_gates > 0).float().reshape(-1, num).mean(0) / r.k for r in group]
            ).mean(0)  # (E,)
            mean_prob = torch.stack([r.last_probs.reshape(-1, num).mean(0) for r in group]).mean(0)
            terms.append(first.aux_coef * num * (share * mean_prob).sum())
        return sum(terms) if terms else None

"""LEGEND (arXiv 2412.20004): a client's LoRA depth and per-layer ranks follow its capability.

The paper's observation: LoRA layers near the output, at higher ranks, cost less (backpropagation
stops at the lowest adapted block) for comparable quality. Client k of capability c_k in (0, 1]
(``capabilities[k mod len]``) adapts the top d_k = ⌈c_k L⌉ of the L decoder blocks, block j from
the output (j = 0 the last) at rank r_k(j) = max(1, ⌈r c_k (1 − j / L)⌉): deeper and of higher
rank with capability, ranks non-decreasing toward the output. The paper picks depth and ranks by
a greedy search over measured device capacities (its LCD algorithm); this closed form keeps the
two monotonicities without a device profile.

The global adapter has a capability-1 client's ranks (r at the last block). A client trains the
first r_k rows of A and columns of B; the server averages every rank row over the clients that
hold it (``held_mean``): zero-padding with the padding left out of the denominator, so low-rank
clients do not shrink rows they never had (plain zero-padding would). Every rank shares one scale
s = alpha / r, so a row means the same to every client. Inexact: FedIT's cross terms, per row.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rankwise.adapters import LoraConfig
from rankwise.fed.base import Scores
from rankwise.fed.layers import AllocatingMethod, layers_of, scale_of, scaled_on

if TYPE_CHECKING:
    from rankwise.fed.config import FedConfig


def legend_ranks(capability: float, blocks: int, rank: int) -> dict[int, int]:
    """Block index (0: nearest the input) -> LoRA rank, for the blocks a client adapts."""
    depth = max(1, math.ceil(capability * blocks))
    return {
        blocks - 1 - j: max(1, math.ceil(rank * capability * (1 - j / blocks)))
        for j in range(depth)
    }


def capability_of(config: FedConfig, partition_id: int) -> float:
    if not config.capabilities:
        return 1.0
    return config.capabilities[partition_id % len(config.capabilities)]


def module_ranks(capability: float, modules: list[str], rank: int) -> dict[str, int]:
    layers = layers_of(modules)
    ranks = legend_ranks(capability, len(layers), rank)
    return {m: ranks[i] for i in sorted(ranks) for m in layers[i]}


class Legend(AllocatingMethod):
    name = "legend"
    paper = "2412.20004"

    def global_lora(self, config: FedConfig, modules: list[str]) -> LoraConfig:
        lora = config.lora()
        return scaled_on(lora, module_ranks(1.0, modules, lora.r), scale_of(lora))

    def local_lora(
        self, config: FedConfig, partition_id: int, modules: list[str], scores: Scores
    ) -> LoraConfig:
        lora = config.lora()
        ranks = module_ranks(capability_of(config, partition_id), modules, lora.r)
        return scaled_on(lora, ranks, scale_of(lora))

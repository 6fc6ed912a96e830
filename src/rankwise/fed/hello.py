"""Fed-HeLLo (arXiv 2506.12213): each client trains the LoRA layers of a few decoder blocks.

Client k's budget is the number of blocks it trains (``hello_budget[k mod len]``, its resources);
``hello_pattern`` picks which:

- ``fisher`` (FIM-HLA, the dynamic pattern): the budget's highest-scoring blocks, a block's score
  the squared gradient norm Σ ‖∂L/∂W‖² of its targeted weights (the empirical Fisher of the mean
  gradient), measured by the client on a few batches of its data at the round's global model, so
  the choice moves as training does;
- the geometric patterns (GD-HLA) shape how many clients train each block, drawn with the input
  at the bottom: ``triangle`` (the blocks nearest the input: the wide base low),
  ``inverted_triangle`` (nearest the output), ``bottleneck`` (half at each end, the middle thin),
  ``uniform`` (evenly spaced, the spacing shifted by the client index so every block is trained
  about equally often). Equal budgets give each shape as a step; unequal ones give its slope.

The server averages each block's A and B over only the clients that trained it (``held_mean``;
FedAvg otherwise, so FedIT's cross terms remain); only the trained blocks travel up. The paper's
randomised geometric variant (RGD-HLA) is not provided.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from rankwise.adapters import LoraConfig
from rankwise.fed.base import Scores
from rankwise.fed.layers import AllocatingMethod, layers_of, scale_of, scaled_on

if TYPE_CHECKING:
    from rankwise.fed.config import FedConfig

# pattern -> (blocks, budget, client) -> the block indices (0: nearest the input) it trains
GEOMETRIC: dict[str, Callable[[int, int, int], list[int]]] = {
    "triangle": lambda n, b, k: list(range(b)),
    "inverted_triangle": lambda n, b, k: list(range(n - b, n)),
    "bottleneck": lambda n, b, k: list(range((b + 1) // 2)) + list(range(n - b // 2, n)),
    "uniform": lambda n, b, k: sorted((j * n // b + k) % n for j in range(b)),
}
PATTERNS = ("fisher", *GEOMETRIC)


def pattern_layers(pattern: str, blocks: int, budget: int, client: int) -> list[int]:
    """The blocks a geometric pattern gives client ``client`` under its budget."""
    return GEOMETRIC[pattern](blocks, min(budget, blocks), client)


def top_layers(scores: list[float], budget: int) -> list[int]:
    """The ``budget`` highest-scoring blocks (ties to the block nearer the input), in order."""
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:budget])


def budget_of(config: FedConfig, partition_id: int, blocks: int) -> int:
    if not config.hello_budget:
        return math.ceil(blocks / 2)
    return config.hello_budget[partition_id % len(config.hello_budget)]


class Hello(AllocatingMethod):
    name = "hello"
    paper = "2506.12213"

    def local_lora(
        self, config: FedConfig, partition_id: int, modules: list[str], scores: Scores
    ) -> LoraConfig:
        layers = layers_of(modules)
        budget = budget_of(config, partition_id, len(layers))
        if config.hello_pattern == "fisher":
            measured = scores()
            chosen = top_layers([sum(measured[m] for m in layer) for layer in layers], budget)
        else:
            chosen = pattern_layers(config.hello_pattern, len(layers), budget, partition_id)
        lora = config.lora()
        return scaled_on(lora, {m: lora.r for i in chosen for m in layers[i]}, scale_of(lora))

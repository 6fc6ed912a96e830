"""What hello and legend share: the targeted modules by layer, an adapter on some of them, and
the aggregation over the clients that trained each module.

A "layer" is a decoder block (``...layers.<i>.``): Fed-HeLLo allocates and LEGEND counts depth
in blocks, every targeted module of a block together.
"""

from __future__ import annotations

import math

from rankwise.adapters import LoraConfig
from rankwise.architectures import block_index
from rankwise.fed.base import ClientUpdate, GlobalState, Method, held_mean
from rankwise.train.trainable import on_modules


def layers_of(modules: list[str]) -> list[list[str]]:
    """The modules grouped by decoder block, from the input (index 0) to the output."""
    blocks: dict[int, list[str]] = {}
    for module in modules:
        blocks.setdefault(block_index(module), []).append(module)
    return [blocks[i] for i in sorted(blocks)]


def scale_of(lora: LoraConfig) -> float:
    """s of a module at the config's rank r: alpha / r (alpha / sqrt(r) with rsLoRA)."""
    return lora.lora_alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)


def scaled_on(lora: LoraConfig, ranks: dict[str, int], scale: float) -> LoraConfig:
    """``lora`` on the modules of ``ranks`` only, each at its rank with the scale ``scale``
    (alpha = s r, or s sqrt(r) with rsLoRA), so a factor means the same at every rank."""
    root = math.sqrt if lora.use_rslora else float
    return on_modules(lora, ranks, {m: scale * root(r) for m, r in ranks.items()})


class AllocatingMethod(Method):
    """A method that gives each client its own modules and ranks: A and B train, and every rank
    row is averaged over the clients that hold it (``held_mean``; FedIT's cross terms remain)."""

    exact = False
    trains = ("A", "B")

    def aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]
    ) -> GlobalState:
        return held_mean(state, updates, weights)

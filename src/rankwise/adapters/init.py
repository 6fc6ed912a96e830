"""Initialisation schemes for LoRA factors, registered by name.

Every scheme leaves B A = 0, so an adapted model starts out equal to its base model. Which
factor starts at zero matters for the training dynamics (Hayou et al., "The Impact of
Initialization on LoRA Finetuning Dynamics", arXiv 2406.08447): Init[A] (B = 0, A random)
allows a larger stable learning rate and is the default, as in PEFT and loralib.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from rankwise.adapters.layer import LowRankExperts

InitScheme = Callable[[torch.Tensor, torch.Tensor], None]  # fills A [r, in], B [out, r] in place


def init_a(a: torch.Tensor, b: torch.Tensor) -> None:
    """Init[A]: A Kaiming-uniform (as nn.Linear, PEFT's default), B zero."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


def init_b(a: torch.Tensor, b: torch.Tensor) -> None:
    """Init[B]: A zero, B Kaiming-uniform over its rank fan-in."""
    nn.init.zeros_(a)
    nn.init.kaiming_uniform_(b, a=math.sqrt(5))


def init_gaussian(a: torch.Tensor, b: torch.Tensor) -> None:
    """A ~ N(0, 1/r^2), B zero (PEFT's ``init_lora_weights="gaussian"``)."""
    nn.init.normal_(a, std=1.0 / a.shape[0])
    nn.init.zeros_(b)


# The one place an init scheme is registered; this order is the order users see.
INIT_SCHEMES: dict[str, InitScheme] = {
    "init_a": init_a,
    "init_b": init_b,
    "gaussian": init_gaussian,
}


@torch.no_grad()
def init_experts(layer: LowRankExperts) -> None:
    """Initialise each expert of a layer in place with its own scheme."""
    for e, expert in enumerate(layer.experts):
        if expert.init not in INIT_SCHEMES:
            raise ValueError(f"unknown init '{expert.init}': choose one of {sorted(INIT_SCHEMES)}")
        if expert.rank == 0:
            continue
        a, b = layer.expert_factors(e)
        INIT_SCHEMES[expert.init](a, b)

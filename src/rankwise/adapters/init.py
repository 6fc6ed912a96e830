"""Initialisation schemes for LoRA factors, registered by name.

Every factor scheme leaves B A = 0, so an adapted model starts out equal to its base model;
the weight-aware ones (PiSSA, OLoRA: ``weight_init``) take the factors from W and leave the
residual in W, which starts the adapted model equal to its base model too. Which
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

from rankwise.adapters.weight_init import DATA_INITS, WEIGHT_INITS, weight_init
from rankwise.architectures import dense_weight
from rankwise.errors import RankwiseError

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


# Inits that also choose the layer's policy (``inject_adapter`` attaches it: KaSA truncates W
# and trains a singular-value diagonal); their factors start as the scheme given here.
POLICY_INITS: dict[str, InitScheme] = {"kasa": init_a}


def init_names() -> list[str]:
    """Every init a LoRA adapter may name: factor schemes, weight-aware, data-driven, policy."""
    return [*INIT_SCHEMES, *WEIGHT_INITS, "pissa_niter_N", *DATA_INITS, *POLICY_INITS]


def check_init(name: str) -> None:
    """Raise naming the choices unless ``name`` is an init scheme."""
    known = (*INIT_SCHEMES, *DATA_INITS, *POLICY_INITS)
    if name not in known and weight_init(name) is None:
        raise RankwiseError(f"unknown init '{name}': choose one of {', '.join(init_names())}")


@torch.no_grad()
def init_experts(layer: LowRankExperts) -> None:
    """Initialise each expert of a layer in place with its own scheme."""
    for e, expert in enumerate(layer.experts):
        check_init(expert.init)
        if expert.rank == 0:
            continue
        if expert.init in DATA_INITS:
            raise RankwiseError(
                f"init '{expert.init}' needs calibration data: train with it through "
                "rankwise.train (--calib), which computes its factors"
            )
        from_weight = weight_init(expert.init)
        if from_weight is not None:
            spec, weight = layer.experts[0], dense_weight(layer.base)
            start_from(layer, *from_weight(weight.to(layer.lora_A.dtype), spec.rank, spec.scaling))
            continue
        a, b = layer.expert_factors(e)
        {**INIT_SCHEMES, **POLICY_INITS}[expert.init](a, b)


@torch.no_grad()
def start_from(layer: LowRankExperts, a: torch.Tensor, b: torch.Tensor) -> None:
    """A computed start: factors (A0, B0), taken out of W, which keeps W - s B0 A0.

    The factors are kept as ``initial_A``/``initial_B``, to save the adapter for the original
    W and to give W back when the experts are removed. A start with B0 = 0 (EVA) leaves W as
    it is, so nothing is kept.
    """
    if layer.num_experts != 1:
        raise RankwiseError(f"'{layer.experts[0].init}' initialises a layer of one expert only")
    spec, weight = layer.experts[0], dense_weight(layer.base)  # weight: [out, in], in place
    layer.lora_A.copy_(a)
    layer.lora_B.copy_(b)
    if not b.any():
        return
    weight -= (spec.scaling * layer.lora_B @ layer.lora_A).to(weight.dtype)
    layer.initial_A = layer.lora_A.detach().clone()
    layer.initial_B = layer.lora_B.detach().clone()

"""What every router shares: common settings, the base policy class and the gate maths.

A router is a policy of ``LowRankExperts``: the layer calls ``policy(layer, x, gates, y)`` with
x in the base's dtype and the base output y, and the router returns y plus the low-rank term
(its gate maths runs in the factors' dtype, fp32, its products in x's dtype, as plain LoRA's).
Routers keep their last gates (``last_gates``, detached, [..., E]) so that
``rankwise mix inspect`` can draw them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rankwise.adapters.init import INIT_SCHEMES
from rankwise.adapters.inject import select_targets, target_option
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.adapters.policy import Policy
from rankwise.options import Options, option


@dataclass
class ExpertOptions(Options):
    """What every router with fresh experts shares: where they go and how they start."""

    target_modules: list[str] | str = target_option()
    init: str = option("init_a", "init scheme of the fresh experts", choices=INIT_SCHEMES)
    lora_alpha: float = option(16.0, "scaling numerator of the experts (each router says how)")


class Router(Policy):
    """A gate policy over one layer's experts; subclasses implement ``forward``.

    A router class names its settings class (``options``); its instances are built per layer
    as ``Router(layer, options, index)``.
    """

    name: ClassVar[str]
    options: ClassVar[type[Options]]

    def __init__(self) -> None:
        super().__init__()
        self.gates_kept: tuple[torch.Tensor, torch.Size] | None = None  # see ``keep_gates``

    def read(
        self, layer: LowRankExperts, x: torch.Tensor, *maps: nn.Linear, down: bool = True
    ) -> tuple[torch.Tensor | None, ...]:
        """A x (None unless ``down``) and each of ``maps`` applied to x, as (tokens, n) fp32 each.

        One product over the concatenated weights in x's dtype, as autocast would run the gate
        linears, with the output cast to the factors' dtype (fp32) for the gate maths: on CPU
        one bf16 product over A and the gates costs less than a bf16 A x plus an fp32 gate
        product (and 3.5x less than one fp32 product at prefill sizes). Router experts have no
        dropout, so A and the gates read the same x. The cast concatenation is formed at every
        training forward and kept between inference forwards (``held``).
        """
        weights = ([layer.lora_A] if down else []) + [m.weight for m in maps]
        sources = weights + [m.bias for m in maps if m.bias is not None]
        weight, bias = self.held(x.dtype, lambda: joint_linear(weights, maps, x.dtype), *sources)
        out = nn.functional.linear(x.reshape(-1, x.shape[-1]), weight, bias)
        parts = out.to(sources[0].dtype).split([w.shape[0] for w in weights], dim=-1)
        return parts if down else (None, *parts)

    def keep_gates(self, gates: torch.Tensor, x: torch.Tensor) -> None:
        """Keep this forward's gates, (tokens, E) or (..., E), for ``last_gates``."""
        self.gates_kept = (gates.detach(), x.shape[:-1])

    @property
    def last_gates(self) -> torch.Tensor | None:
        """The last forward's gates (..., E), detached; shaped only when asked (decoding
        calls every router hundreds of times per token, inspection reads a few)."""
        if self.gates_kept is None:
            return None
        gates, lead = self.gates_kept
        return gates.view(*lead, -1)

    @classmethod
    def layer_specs(cls, model: nn.Module, options: Options) -> dict[str, list[ExpertSpec]]:
        """The experts of every module the mixture adapts."""
        raise NotImplementedError(f"{cls.__name__} does not say which experts it holds")

    @classmethod
    def initialise(
        cls, model: nn.Module, layers: dict[str, LowRankExperts], options: Options
    ) -> None:
        """Fill the experts' factors of a fresh mixture (they are random already by default)."""

    @classmethod
    def head(
        cls, model: nn.Module, layers: dict[str, LowRankExperts], options: Options
    ) -> nn.Module:
        """A model-level module the router needs (X-LoRA's classifier); none by default."""
        return nn.Module()

    def trainable(self, layer: LowRankExperts) -> list[nn.Parameter]:
        """Parameters trained for this layer: both factors and the router's own by default."""
        return [layer.lora_A, layer.lora_B, *self.parameters()]

    @classmethod
    def aux_loss(cls, routers: dict[str, Router]) -> torch.Tensor | None:
        """The auxiliary loss of a mixture's last forward, from all its routers by module name,
        added to the training loss (None, the default: there is none)."""
        return None

    def step_counts(self) -> list[torch.Tensor]:
        """Counters of this step's training forwards that data-parallel runs sum over processes."""
        return []

    def after_step(self) -> None:
        """Bookkeeping after each optimizer step (none by default)."""


# Grouped dispatch pays for gathering each expert's tokens and scattering its outputs back, and
# for a few operations per expert, only when there are many tokens and every chosen expert saves
# much rank work; elsewhere the dense masked product is faster (bench/routing.py, 2-core CPU:
# dense 1.9-40x faster at 16 tokens for every shape, grouped ahead from 2k tokens and 128 ranks).
GROUPED_MIN_SKIPPED_RANKS = 128  # (E - k) r / k
GROUPED_MIN_TOKENS = 1024


def equal_experts(
    model: nn.Module, options: ExpertOptions, rank: int, count: int
) -> dict[str, list[ExpertSpec]]:
    """``count`` fresh experts of rank ``rank`` in every targeted module."""
    spec = ExpertSpec(rank, options.lora_alpha, init=options.init)
    return {name: [spec] * count for name in select_targets(model, options.target_modules)}


def top_k_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of softmax(logits) renormalised to sum 1, and their indices. (..., k) each

    Computed as the softmax of the k largest logits, which is the same and skips the rest.
    """
    values, chosen = logits.topk(k, dim=-1)
    return torch.softmax(values, dim=-1), chosen


def joint_linear(
    weights: list[torch.Tensor], maps: tuple[nn.Linear, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight stacking ``weights`` (A first, if read) and a bias with the maps' biases in
    their rows (zeros elsewhere, None when no map has one), both in ``dtype``."""
    weight = (weights[0] if len(weights) == 1 else torch.cat(weights)).to(dtype)
    if all(m.bias is None for m in maps):
        return weight, None
    pads = weight.shape[0] - sum(m.weight.shape[0] for m in maps)
    parts = [weight.new_zeros(pads)] + [
        m.bias.to(dtype) if m.bias is not None else weight.new_zeros(m.weight.shape[0])
        for m in maps
    ]
    return weight, torch.cat(parts)


def dense_gates(weights: torch.Tensor, chosen: torch.Tensor, n: int) -> torch.Tensor:
    """Top-k weights scattered into a dense (..., n) gate tensor with zeros elsewhere."""
    return weights.new_zeros(*weights.shape[:-1], n).scatter(-1, chosen, weights)


def grouped(layer: LowRankExperts, k: int, tokens: int) -> bool:
    """Whether ``routed_sum`` groups ``tokens`` tokens by expert, given top-k routing."""
    total = layer.lora_A.shape[0]
    skipped = (total - k * total / layer.num_experts) / k  # per chosen expert, mean rank
    return tokens >= GROUPED_MIN_TOKENS and skipped >= GROUPED_MIN_SKIPPED_RANKS


def routed_sum(
    layer: LowRankExperts,
    x: torch.Tensor,
    gates: torch.Tensor,
    chosen: torch.Tensor,
    into: torch.Tensor,
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    """into + sum_e g_e s_e B_e A_e x over each token's chosen experts.

    x (..., in), gates (..., E) zero outside the chosen experts, chosen (..., k); h is A x when
    the router read it (``Router.read``), which means the dense way. Two ways give
    the same sum (a test checks it): grouped, tokens are gathered per expert and each group
    costs one product with A_e and one with B_e, so an expert no token chose never runs; dense,
    all experts run in the two products of a plain LoRA and unchosen ones get gate 0 in rank
    space (exactly zero output and gradient). Grouping saves (E - k) / E of the rank work but
    moves every token's rows twice and costs a few operations per expert, so it is used only
    where the skipped work is large (``grouped``).
    """
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    if h is not None:
        return layer.up(h, layer.rank_gate(gates), into)
    if not grouped(layer, chosen.shape[-1], flat.shape[0]):
        return layer.gated(x, layer.rank_gate(gates), into)
    idx = chosen.reshape(flat.shape[0], -1)  # (N, k)
    w = gates.reshape(flat.shape[0], -1).gather(-1, idx)  # (N, k)
    out = into.reshape(flat.shape[0], -1)
    for e, spec in enumerate(layer.experts):
        token, slot = (idx == e).nonzero(as_tuple=True)
        if token.numel() == 0 or spec.rank == 0:
            continue
        a, b = (f.to(x.dtype) for f in layer.expert_factors(e))
        h = (flat[token] @ a.T) * (w[token, slot] * spec.scaling).to(x.dtype)[:, None]  # (n_e, r)
        out = out.index_add(0, token, h @ b.T)
    return out.view(into.shape)

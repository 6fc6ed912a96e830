"""What every router shares: its settings, the base policy class, the registry and gate maths.

A router is a policy of ``LowRankExperts``: the layer calls ``policy(layer, x, gates, y)`` with
x in the base's dtype and the base output y, and the router returns y plus the low-rank term
(its gate maths runs in the factors' dtype, fp32, its products in x's dtype, as plain LoRA's).
Routers keep their last gates (``last_gates``, detached, [..., E]) so that
``rankwise mix inspect`` can draw them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from rankwise.adapters.inject import select_targets
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.errors import RankwiseError


@dataclass
class RouterConfig:
    """A mixture's settings; the same names are keys of ``rankwise mix train`` configs."""

    router: str = "mola"  # xlora, mola, smora, flylora or radargate
    r: int = 8  # rank of each expert (mola, radargate); total rank R (smora, flylora)
    lora_alpha: float = 16.0  # scaling alpha / r (smora: alpha / top_k; flylora: alpha / R)
    target_modules: list[str] | str = "all-linear"  # modules that get experts
    init: str = "init_a"  # init scheme of fresh experts
    num_experts: int = 4  # experts per module (mola when expert_pattern is empty, radargate)
    expert_pattern: str = ""  # mola: counts over equal depth groups, e.g. "2,4,6,8"
    top_k: int = 2  # experts (ranks) used per token; 0 means all (dense, xlora)
    aux_coef: float = 0.0  # mola: Switch load-balancing loss weight (the paper uses 0.001)
    bias_rate: float = 1e-3  # smora, flylora: step of the balancing bias after each step
    adapters: list[str] = field(default_factory=list)  # xlora: PEFT adapter folders (experts)
    layerwise: bool = False  # xlora: separate scalings for every adapted module
    classifier_depth: int = 1  # xlora: linear layers of the classifier (1: one linear map)
    classifier_hidden: int = 64  # xlora: width of the classifier's hidden layers
    temperature: float = 1.0  # xlora: softmax temperature of the scalings
    scaling_pass_value: float = 0.0  # xlora: constant scaling of adapters in the first pass

    def __post_init__(self) -> None:
        self.expert_pattern = str(self.expert_pattern)  # YAML reads a single count as an int
        if self.router not in ROUTERS:
            raise RankwiseError(
                f"unknown router '{self.router}': choose one of {', '.join(sorted(ROUTERS))}"
            )
        if self.r < 1 or self.num_experts < 1 or self.top_k < 0 or self.classifier_depth < 1:
            raise RankwiseError("r, num_experts and classifier_depth must be >= 1, top_k >= 0")
        if self.temperature <= 0:
            raise RankwiseError("temperature must be positive")
        ROUTERS[self.router].check(self)


class Router(nn.Module):
    """A gate policy over one layer's experts; subclasses implement ``forward``."""

    name: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.gates_kept: tuple[torch.Tensor, torch.Size] | None = None  # see ``keep_gates``
        # name (read's: x's dtype) -> (key of its sources, value); see ``held``
        self.kept: dict[Hashable, tuple[tuple, Any]] = {}

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

    def held(self, name: Hashable, make: Callable[[], Any], *sources: torch.Tensor) -> Any:
        """``make()``: formed at every training forward, kept between inference forwards.

        ``sources`` change only through in-place writes (optimizer steps, loading), which bump
        their version, so the kept value is formed again after any of them. It is formed as a
        normal tensor even in inference mode, so a later training forward may still use it
        (FlyLoRA's frozen A).
        """
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return make()
        key = tuple([(t.data_ptr(), t._version) for t in sources])
        kept = self.kept.get(name)
        if kept is None or kept[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                kept = self.kept[name] = (key, make())
        return kept[1]

    @classmethod
    def check(cls, config: RouterConfig) -> None:
        """Raise a ``RankwiseError`` if ``config`` does not suit this router."""

    @classmethod
    def layer_specs(cls, model: nn.Module, config: RouterConfig) -> dict[str, list[ExpertSpec]]:
        """The experts of every targeted module (fresh ones: the default is E of rank r)."""
        spec = ExpertSpec(config.r, config.lora_alpha, init=config.init)
        return {
            name: [spec] * config.num_experts
            for name in select_targets(model, config.target_modules)
        }

    @classmethod
    def initialise(
        cls, model: nn.Module, layers: dict[str, LowRankExperts], config: RouterConfig
    ) -> None:
        """Fill the experts' factors of a fresh mixture (they are random already by default)."""

    @classmethod
    def head(
        cls, model: nn.Module, layers: dict[str, LowRankExperts], config: RouterConfig
    ) -> nn.Module:
        """A model-level module the router needs (X-LoRA's classifier); none by default."""
        return nn.Module()

    def trainable(self, layer: LowRankExperts) -> list[nn.Parameter]:
        """Parameters trained for this layer: both factors and the router's own by default."""
        return [layer.lora_A, layer.lora_B, *self.parameters()]

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    @classmethod
    def aux_loss(cls, routers: dict[str, Router]) -> torch.Tensor:
        """The auxiliary loss of a mixture's last forward, from all its routers by module name,
        added to the training loss (none by default)."""
        return torch.zeros(())

    def step_counts(self) -> list[torch.Tensor]:
        """Counters of this step's training forwards that data-parallel runs sum over processes."""
        return []

    def after_step(self) -> None:
        """Bookkeeping after each optimizer step (none by default)."""


ROUTERS: dict[str, type[Router]] = {}
# Grouped dispatch pays for gathering each expert's tokens and scattering its outputs back, and
# for a few operations per expert, only when there are many tokens and every chosen expert saves
# much rank work; elsewhere the dense masked product is faster (bench/routing.py, 2-core CPU:
# dense 1.9-40x faster at 16 tokens for every shape, grouped ahead from 2k tokens and 128 ranks).
GROUPED_MIN_SKIPPED_RANKS = 128  # (E - k) r / k
GROUPED_MIN_TOKENS = 1024


def register(cls: type[Router]) -> type[Router]:
    """Register a router class under its ``name``."""
    ROUTERS[cls.name] = cls
    return cls


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

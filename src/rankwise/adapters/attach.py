"""Adapters on a model: checking they fit, attaching them as experts, copying them back out.

``LoraWeights`` (``peft_format``) is an adapter independent of any model; this module is where
one meets a model: ``load_adapter``/``attach_adapters`` put adapters into ``LowRankExperts``
layers, ``save_adapter``/``weights_from_model`` take an expert out again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rankwise.adapters.dora import DoRA
from rankwise.adapters.inject import adaptable_modules, expert_layers, inject_experts, module_kinds
from rankwise.adapters.kasa import PENALTIES, KaSA
from rankwise.adapters.l4q import check_not_l4q
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.adapters.peft_format import LoraWeights, read_adapter, write_adapter
from rankwise.adapters.weight_init import converted_alpha
from rankwise.architectures import linear_shape
from rankwise.errors import RankwiseError


def check_compatible(model: nn.Module, weights: LoraWeights, source: str = "adapter") -> None:
    """Raise naming the module and both shapes if ``weights`` do not fit the model's layers."""
    available = adaptable_modules(model)
    for module, (a, b) in weights.factors.items():
        if module not in available:
            raise RankwiseError(
                f"{source} targets '{module}', which this model does not have "
                f"(its linear layers are {', '.join(module_kinds(available))}); "
                f"was it trained for another base model ({weights.base_model})?"
            )
        fan_in, fan_out = linear_shape(available[module])
        expected_a = [a.shape[0], fan_in]
        expected_b = [fan_out, b.shape[1]]
        if list(a.shape) != expected_a or list(b.shape) != expected_b:
            raise RankwiseError(
                f"{source} does not fit this model at '{module}': lora_A {list(a.shape)} and "
                f"lora_B {list(b.shape)}, but the layer needs {expected_a} and {expected_b} "
                f"(weight {[fan_out, fan_in]}); "
                f"it was trained for {weights.base_model or 'another base model'}"
            )
        magnitude = weights.magnitudes.get(module)
        if magnitude is not None and list(magnitude.shape) != [fan_out]:
            raise RankwiseError(
                f"{source} does not fit this model at '{module}': its DoRA magnitude has shape "
                f"{list(magnitude.shape)}, but the layer needs [{fan_out}]"
            )


def stacked_specs(
    model: nn.Module, adapters: Sequence[LoraWeights], names: Sequence[str]
) -> dict[str, list[ExpertSpec]]:
    """Experts 0..N-1 of every module some adapter touches, each adapter checked against the
    model; a module an adapter leaves out gets a rank-0 expert there, so expert e is adapter e
    in every layer. A DoRA or KaSA adapter only stands alone (it changes how the whole layer
    meets W).
    """
    for name, weights in zip(names, adapters, strict=True):
        check_compatible(model, weights, f"adapter {name}")
    if len(adapters) > 1 and any(w.variant for w in adapters):
        name, kind = next((n, w.variant) for n, w in zip(names, adapters, strict=True) if w.variant)
        raise RankwiseError(
            f"adapter {name} is a {kind} adapter: {kind} adapters attach one at a time (they "
            "change how the whole layer meets W), never as experts beside other adapters"
        )
    modules = list(dict.fromkeys(m for w in adapters for m in w.factors))
    return {
        m: [w.expert(m) if m in w.factors else ExpertSpec(0, 1.0) for w in adapters]
        for m in modules
    }


@torch.no_grad()
def attach_adapters(
    model: nn.Module, adapters: Sequence[LoraWeights], names: Sequence[str] | None = None
) -> dict[str, LowRankExperts]:
    """Inject the adapters as experts 0..N-1 of each layer they touch (``stacked_specs``)."""
    specs = stacked_specs(model, adapters, names or [str(i) for i in range(len(adapters))])
    layers = inject_experts(model, specs)
    for module, magnitude in adapters[0].magnitudes.items() if adapters else ():
        layers[module].policy = DoRA(layers[module], magnitude)
    for module, diagonal in adapters[0].diagonals.items() if adapters else ():
        layers[module].policy = KaSA(layers[module], diagonal, *adapters[0].kasa)
    copy_factors(layers, adapters)
    return layers


@torch.no_grad()
def copy_factors(layers: dict[str, LowRankExperts], adapters: Sequence[LoraWeights]) -> None:
    """Copy adapter e's factors into expert e of every layer the adapter has weights for
    (and a DoRA adapter's magnitudes or a KaSA adapter's diagonals into its layers' policies).

    A layer whose W holds a weight-aware init's residual takes the trained half of the rank-2r
    adapter ``weights_from_model`` wrote for it (checking the other half is its initial one).
    """
    for module, layer in layers.items():
        for e, weights in enumerate(adapters):
            if module in weights.factors:
                a, b = trained_half(layer, module, *weights.factors[module])
                target_a, target_b = layer.expert_factors(e)
                target_a.copy_(a)
                target_b.copy_(b)
            if module in weights.magnitudes:
                layer.adapter_params()["lora_magnitude_vector"].copy_(weights.magnitudes[module])
            if module in weights.diagonals:
                layer.adapter_params()["lora_diag"].copy_(weights.diagonals[module])


def trained_half(
    layer: LowRankExperts, module: str, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors to copy into ``layer``: (a, b) as they are, or for a residual layer the first
    r ranks of the conversion [A; A0], [B, -B0] (its last r must be the layer's own A0, -B0)."""
    if not layer.residual:
        return a, b
    rank = layer.initial_A.shape[0]
    same = a.shape[0] == 2 * rank and torch.allclose(
        a[rank:].to(layer.initial_A), layer.initial_A, atol=1e-6
    )
    if not same or not torch.allclose(-b[:, rank:].to(layer.initial_B), layer.initial_B, atol=1e-6):
        raise RankwiseError(
            f"'{module}' starts from a weight-aware init (its W holds a residual), but the adapter "
            "does not carry that init's factors: it was trained from another start"
        )
    return a[:rank], b[:, :rank]


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, LowRankExperts]:
    """Read a PEFT adapter folder and attach it to the model as a single expert per module."""
    check_not_l4q(path)
    return attach_adapters(model, [read_adapter(path)], [str(path)])


def weights_from_model(
    model: nn.Module, expert: int = 0, base_model: str | None = None
) -> LoraWeights:
    """Copy one expert out of every adapted layer of a model as standalone weights.

    They always fit the original base model: a layer whose W holds a weight-aware init's
    residual (PiSSA, OLoRA) is written as PEFT converts it, s [B, -B0] [A; A0] at rank 2r.
    """
    layers = expert_layers(model)
    if not layers:
        raise RankwiseError("the model has no adapters to save")
    factors, alphas, rslora, dropouts, transposed = {}, {}, set(), set(), False
    magnitudes, diagonals, kasa = {}, {}, PENALTIES
    for name, layer in layers.items():
        spec = layer.experts[expert]
        if spec.rank == 0:
            continue
        a, b = (f.detach().clone() for f in layer.policy.saved_factors(layer, expert))
        alphas[name] = spec.alpha
        if layer.residual:
            a, b = torch.cat([a, layer.initial_A]), torch.cat([b, -layer.initial_B], dim=1)
            alphas[name] = converted_alpha(spec.alpha, spec.use_rslora)
        factors[name] = (a, b)
        rslora.add(spec.use_rslora)
        dropouts.add(spec.dropout)
        transposed |= layer.fan_in_fan_out
        params = layer.adapter_params()
        if "lora_magnitude_vector" in params:
            magnitudes[name] = params["lora_magnitude_vector"].detach().clone()
        if isinstance(layer.policy, KaSA):
            diagonals[name] = layer.policy.diagonal.detach().clone()
            kasa = (layer.policy.beta, layer.policy.gamma)
    if len(rslora) > 1:
        raise RankwiseError("PEFT's format needs one use_rslora setting for the whole adapter")
    return LoraWeights(
        factors,
        alphas,
        rslora.pop(),
        max(dropouts),
        base_model,
        transposed,
        magnitudes,
        diagonals,
        kasa,
    )


def save_adapter(
    model: nn.Module, path: str | os.PathLike, base_model: str | None = None, expert: int = 0
) -> Path:
    """Save one expert of the model's adapters as a PEFT adapter folder."""
    return write_adapter(weights_from_model(model, expert, base_model), path)

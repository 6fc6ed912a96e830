"""X-LoRA (arXiv 2402.07148): a classifier mixes frozen, pre-trained LoRA adapters per token.

Base model and adapters stay frozen. A first (scaling) pass runs the model with every adapter
scaled by ``scaling_pass_value`` (0: the base model) and yields the last hidden state; a
classifier (one linear layer, or an MLP of ``classifier_depth`` layers) maps it to per-token
scalings over the experts (one set per adapted module when ``layerwise``), a softmax with
``temperature``. The second pass applies them. Unlike PEFT's implementation, top-k keeps the k
largest scalings renormalised to sum 1 per token, and only the selected experts run.

Generation keeps a KV cache for each pass: the scaling pass has its own cache beside the
model's, so each decoding step runs both passes on the new token only (PEFT's X-LoRA disables
the cache and re-reads the whole sequence twice per token). With ``scaling_pass_value`` 0 the
scaling pass is exactly the bare base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Cache, DynamicCache

from rankwise.adapters.attach import copy_factors, stacked_specs
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.adapters.peft_format import read_adapter
from rankwise.errors import RankwiseError
from rankwise.options import Options, option
from rankwise.routers.base import Router, dense_gates, routed_sum, top_k_softmax


@dataclass
class XLoRAOptions(Options):
    """X-LoRA's settings: the frozen adapters it mixes and the classifier that mixes them."""

    adapters: list[str] = option([], "PEFT adapter folders to mix (the experts, kept frozen)")
    top_k: int = option(2, "adapters used per token (0: all, dense)", within="[0, inf)")
    layerwise: bool = option(False, "separate scalings for every adapted module")
    classifier_depth: int = option(
        1, "linear layers of the classifier (1: one linear map)", within="[1, inf)"
    )
    classifier_hidden: int = option(
        64, "width of the classifier's hidden layers", within="[1, inf)"
    )
    temperature: float = option(1.0, "softmax temperature of the scalings", within="(0, inf)")
    scaling_pass_value: float = option(
        0.0, "constant scaling of every adapter in the first pass (0: the base model)"
    )

    def check(self) -> None:
        super().check()
        if not self.adapters:
            raise RankwiseError("xlora needs `adapters`: the PEFT adapter folders to mix")


class Scalings:
    """State the classifier shares with every layer's policy during one forward."""

    def __init__(self) -> None:
        self.scaling_pass = False
        self.weights = torch.zeros(0)  # (B, T, L, k) per-token scalings of the chosen experts
        self.chosen = torch.zeros(0, dtype=torch.long)  # (B, T, L, k) their expert indices
        self.hook: RemovableHandle | None = None  # the head's pre-hook on the decoder


def classifier(width: int, outputs: int, depth: int, hidden: int) -> nn.Sequential:
    """One linear map (depth 1) or an MLP with ``depth - 1`` ReLU hidden layers."""
    sizes = [width] + [hidden] * (depth - 1) + [outputs]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(pairwise(sizes)):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class XLoRAHead(nn.Module):
    """The classifier, run by a forward pre-hook on the decoder before the real pass."""

    def __init__(self, model: nn.Module, layers: dict[str, LowRankExperts], config: XLoRAOptions):
        super().__init__()
        num = {layer.num_experts for layer in layers.values()}.pop()
        self.num_experts = num
        self.num_layers = len(layers) if config.layerwise else 1
        self.k = min(config.top_k or num, num)
        self.temperature = config.temperature
        self.classifier = classifier(
            model.config.hidden_size,
            self.num_layers * num,
            config.classifier_depth,
            config.classifier_hidden,
        ).to(next(iter(layers.values())).lora_A)
        self.state = Scalings()
        for layer in layers.values():
            layer.policy.state = self.state
        self.cache: Cache | None = None  # the scaling pass's KV cache during generation
        self.state.hook = model.get_decoder().register_forward_pre_hook(
            self.scale, with_kwargs=True
        )

    def scale(self, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
        """Run the scaling pass and the classifier; the hooked call then does the real pass.

        When the real pass brings a KV cache (generation), the scaling pass continues its own
        cache in step with it: a fresh one when the real cache is empty (a new generation).
        """
        if self.state.scaling_pass:
            return
        keys = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
        inputs = {k: kwargs.get(k) for k in keys}
        if args:
            inputs["input_ids"] = args[0]
        real = kwargs.get("past_key_values")
        if real is None:
            self.cache = None
        elif real.get_seq_length() == 0:
            self.cache = DynamicCache(config=decoder.config)
        elif self.cache is None or self.cache.get_seq_length() != real.get_seq_length():
            raise RankwiseError("X-LoRA: the scaling pass's KV cache is out of step with the model")
        self.state.scaling_pass = True
        try:
            with torch.no_grad():
                hidden = decoder(
                    **inputs, past_key_values=self.cache, use_cache=self.cache is not None
                ).last_hidden_state  # (B, T, H)
        finally:
            self.state.scaling_pass = False
        logits = self.classifier(hidden.to(self.classifier[0].weight.dtype))
        logits = logits.unflatten(-1, (self.num_layers, self.num_experts))  # (B, T, L, E)
        self.state.weights, self.state.chosen = top_k_softmax(logits / self.temperature, self.k)


class XLoRA(Router):
    """Applies the classifier's scalings to this layer's frozen experts (top-k sparse)."""

    name = "xlora"
    options = XLoRAOptions

    def __init__(self, layer: LowRankExperts, config: XLoRAOptions, index: int):
        super().__init__()
        self.index = index if config.layerwise else 0
        self.pass_value = config.scaling_pass_value
        self.state = Scalings()  # replaced by the head's shared state

    @classmethod
    def layer_specs(cls, model: nn.Module, config: XLoRAOptions) -> dict[str, list[ExpertSpec]]:
        weights = [read_adapter(path) for path in config.adapters]
        for path, w in zip(config.adapters, weights, strict=True):
            if w.variant:
                raise RankwiseError(
                    f"xlora mixes plain LoRA adapters; '{path}' is a {w.variant} adapter (it "
                    "changes how the whole layer meets W, which a per-token mix cannot keep)"
                )
        return stacked_specs(model, weights, [f"'{path}'" for path in config.adapters])

    @classmethod
    def initialise(
        cls, model: nn.Module, layers: dict[str, LowRankExperts], config: XLoRAOptions
    ) -> None:
        """Copy the adapters' factors into the experts (adapter e is expert e everywhere)."""
        copy_factors(layers, [read_adapter(path) for path in config.adapters])

    @classmethod
    def head(
        cls, model: nn.Module, layers: dict[str, LowRankExperts], config: XLoRAOptions
    ) -> nn.Module:
        return XLoRAHead(model, layers, config)

    def trainable(self, layer: LowRankExperts) -> list[nn.Parameter]:
        return []

    def release(self) -> None:
        """Remove the classifier's hook from the decoder (once, for all layers sharing it)."""
        if self.state.hook is not None:
            self.state.hook.remove()
            self.state.hook = None

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        if self.state.scaling_pass:
            return self.scaling_pass(layer, x, into)
        weights = self.state.weights[..., self.index, :]  # (B, T, k)
        chosen = self.state.chosen[..., self.index, :]
        gates = dense_gates(weights, chosen, layer.num_experts)
        self.keep_gates(gates, x)
        return routed_sum(layer, x, gates, chosen, into)

    def scaling_pass(
        self, layer: LowRankExperts, x: torch.Tensor, into: torch.Tensor
    ) -> torch.Tensor:
        """Every adapter scaled by the constant; with 0 (the default) no expert runs at all."""
        if self.pass_value == 0:
            return into
        return layer.gated(x, layer.rank_scaling * self.pass_value, into)

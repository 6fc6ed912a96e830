"""The SVD family's shared driver: every linear layer becomes a rank-r ``LowRankLinear``.

Methods differ only in the input transform S (``whitening``) applied before the SVD; the rank
of an m×n layer is ⌊(1 - ratio)·m·n/(m+n)⌋, so its two factors hold the kept fraction of its
parameters, which is how SVD-LLM (arXiv 2403.07378) and ASVD (arXiv 2312.05821) count. Every
linear map inside a decoder layer is factored, fused ones (Phi-3's qkv_proj, GPT-NeoX's
query_key_value) and GPT-2's ``Conv1D`` included; embeddings and the output head, which lie
outside the decoder layers (and are tied in Gemma2 and GPT-2), never are.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rankwise.architectures import linear_shape
from rankwise.compress.base import Compressor, decoder_layers, input_key, layer_linears
from rankwise.compress.calibration import Statistics
from rankwise.compress.lowrank import factorize_linear, rank_for_ratio
from rankwise.errors import RankwiseError

Whitening = tuple[torch.Tensor | None, torch.Tensor | None]  # (S, S⁻¹), None for the identity


@dataclasses.dataclass
class Factorizer(Compressor):
    """Replace each linear layer W of a decoder layer by U_r Σ_r^½ · Σ_r^½ V_rᵀ S⁻¹ (SVD of W S)."""

    def input_kinds(self) -> set[str]:
        """Statistic kinds the whitening reads for each linear input."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its statistics")

    def whitening(self, stats: Statistics, key: str) -> Whitening:
        """The input transform S and its inverse (float64, via ``for_factoring``) for ``key``."""
        raise NotImplementedError(f"{type(self).__name__} does not define its whitening")

    def check_model(self, model: nn.Module) -> None:
        _, layers = decoder_layers(model)
        for index, layer in enumerate(layers):
            if not layer_linears(layer):
                raise RankwiseError(f"decoder layer {index} has no linear layer to factorize")

    def needs(self, model: nn.Module) -> dict[str, set[str]]:
        kinds = self.input_kinds()
        if not kinds:
            return {}
        prefix, layers = decoder_layers(model)
        return {
            input_key(model, f"{prefix}.{index}.{name}"): set(kinds)
            for index, layer in enumerate(layers)
            for name in layer_linears(layer)
        }

    def compress_layer(self, model: nn.Module, index: int, ratio: float, stats: Statistics) -> None:
        prefix, layers = decoder_layers(model)
        layer = layers[index]
        for name, linear in layer_linears(layer).items():
            scale, scale_inv = self.whitening(stats, input_key(model, f"{prefix}.{index}.{name}"))
            in_features, out_features = linear_shape(linear)
            rank = rank_for_ratio(out_features, in_features, ratio)
            layer.set_submodule(name, factorize_linear(linear, rank, scale, scale_inv))

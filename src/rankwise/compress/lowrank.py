"""A linear map stored as two smaller ``nn.Linear`` layers, and the (whitened) SVD that builds it.

The SVD family (plain SVD, ASVD arXiv 2312.05821, SVD-LLM arXiv 2403.07378) differs only in the
input transform S applied before the SVD: W S = U Σ Vᵀ, then W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ S⁻¹).
Both halves are plain ``nn.Linear`` modules so LoRA adapters can target them, whatever the layer
they replace (``nn.Linear`` or GPT-2's ``Conv1D``, whose weight is stored [in, out]).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankwise.architectures import dense_weight, linear_shape
from rankwise.compress.precision import for_factoring


class LowRankLinear(nn.Module):
    """y = second(first(x)): ``first`` maps in -> rank, ``second`` maps rank -> out (+ bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def spec(self) -> dict:
        """The JSON entry that rebuilds this module's shape (see docs/compression.md)."""
        return {
            "type": "low_rank",
            "in_features": self.first.in_features,
            "out_features": self.second.out_features,
            "rank": self.first.out_features,
            "bias": self.second.bias is not None,
        }


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank whose two factors hold a fraction 1 - ratio of m·n parameters: ⌊p·m·n/(m+n)⌋."""
    kept = (1.0 - ratio) * out_features * in_features / (out_features + in_features)
    return max(1, math.floor(kept))


def low_rank_factors(
    weight: torch.Tensor,
    rank: int,
    scale: torch.Tensor | None = None,
    scale_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first [rank, in], second [out, rank]) from the truncated SVD of weight·scale, in float64.

    ``weight`` is [out, in]; ``scale`` is the input transform S ([in, in]; None for the
    identity) and ``scale_inv`` its inverse, applied to the first factor so that second @ first
    ≈ weight. Both come from ``for_factoring``, so all three lie on one device.
    """
    w = for_factoring(weight)
    target = w @ scale if scale is not None else w  # (out, in)
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    second = u[:, :rank] * root  # (out, r): U_r Σ_r^½
    first = root[:, None] * vh[:rank]  # (r, in): Σ_r^½ V_rᵀ
    if scale_inv is not None:
        first = first @ scale_inv  # undo the input transform: Σ_r^½ V_rᵀ S⁻¹
    return first, second


def factorize_linear(
    linear: nn.Module,
    rank: int,
    scale: torch.Tensor | None = None,
    scale_inv: torch.Tensor | None = None,
) -> LowRankLinear:
    """A ``LowRankLinear`` approximating ``linear``, an ``nn.Linear`` or ``Conv1D``.

    Built on the layer's device in its dtype; the bias is kept as it is.
    """
    weight = dense_weight(linear)  # (out, in) for either layout
    first, second = low_rank_factors(weight, rank, scale, scale_inv)
    bias = linear.bias is not None
    in_features, out_features = linear_shape(linear)
    module = LowRankLinear(
        in_features, out_features, rank, bias, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        module.first.weight.copy_(first)
        module.second.weight.copy_(second)
        if bias:
            module.second.bias.copy_(linear.bias)
    return module.requires_grad_(False)

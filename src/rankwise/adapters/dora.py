"""DoRA (arXiv 2402.09353): weight-decomposed low-rank adaptation, a policy of the experts layer.

    W' = m * (W + s B A) / ||W + s B A||_row

A trained magnitude m [out] rescales each output row of the adapted weight to its own length.
As in the paper (section 4.3) and PEFT, the row norm is a constant of each forward (no gradient
flows through it), and the forward is y = b + (m / n) * (W x + s B A x); with dropout active
in training it is PEFT's y = W x + b + (m / n - 1) W drop(x) + (m / n) s B A drop(x), so
adapters move between the two libraries with the same logits. m starts at ||W||_row, so the
adapted model starts equal to its base model.

PEFT forms W + s B A ([out, in]) at every forward to take its norm, which is why its DoRA is
much slower than LoRA. Here the squared norm comes from rank space,

    ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T,

one [out, in] x [in, r] product and [out, r] sums, with ||W_i||^2 kept (W is frozen) and the
whole norm kept between inference forwards.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.adapters.layer import LowRankExperts
from rankwise.adapters.policy import Policy
from rankwise.architectures import dense_weight
from rankwise.errors import RankwiseError


class DoRA(Policy):
    """One expert whose update is decomposed into a direction and a trained magnitude."""

    def __init__(self, layer: LowRankExperts, magnitude: torch.Tensor | None = None):
        super().__init__()
        if layer.num_experts != 1:
            raise RankwiseError("DoRA adapts a layer with one expert, not a stack of them")
        norm = self.weight_norm(layer) if magnitude is None else magnitude
        self.magnitude = nn.Parameter(norm.detach().to(layer.lora_A).clone())  # (out,)
        self.merged_norm: torch.Tensor | None = None  # the norm merge divided by, for unmerge

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_magnitude_vector": self.magnitude}  # PEFT's name

    @torch.no_grad()
    def weight_norm(self, layer: LowRankExperts) -> torch.Tensor:
        """||W + s B A|| per output row, in the factors' dtype, without forming W + s B A. (out,)

        Kept until W, A or B change (an optimizer step, a merge): micro-batches of one step
        and every inference forward reuse it.
        """
        weight, a, b = dense_weight(layer.base), layer.lora_A, layer.lora_B  # W: (out, in)
        squares = self.held("squares", lambda: weight.to(a.dtype).square().sum(1), weight)
        gate = layer.rank_gate(None)
        return self.held("norm", lambda: rank_space_norm(weight, squares, a, b, gate), weight, a, b)

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        scale = (self.magnitude / self.weight_norm(layer)).to(into.dtype)  # (out,): m / n
        drop = layer.dropout_runs[0]
        bias = layer.base.bias
        if isinstance(drop, nn.Identity) or not self.training:
            t = layer.gated(x, layer.rank_gate(None), into)  # W x + b + s B A x
            if bias is None:
                return t * scale
            return torch.addcmul((1 - scale) * bias, t, scale)  # b + (m/n)(W x + s B A x)
        dropped = drop(x)
        plain = nn.functional.linear(dropped, dense_weight(layer.base))  # W drop(x)
        h = nn.functional.linear(dropped, layer.lora_A.to(x.dtype))  # (..., r)
        t = layer.up(h, layer.rank_gate(None), plain)  # W drop(x) + s B A drop(x)
        return torch.addcmul(into - plain, t, scale)

    def merge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        """W <- (m / n) (W + s B A), with n taken before merging (kept for ``unmerge``)."""
        self.merged_norm = self.weight_norm(layer).clone()
        weight += layer.delta_weight().to(weight.dtype)
        weight *= (self.magnitude / self.merged_norm).to(weight.dtype)[:, None]

    def unmerge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        """W <- W (n / m) - s B A."""
        weight /= (self.magnitude / self.merged_norm).to(weight.dtype)[:, None]
        weight -= layer.delta_weight().to(weight.dtype)
        self.merged_norm = None


def rank_space_norm(
    weight: torch.Tensor,
    squares: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """||W_i + (s B A)_i|| from ||W_i||^2 (``squares``), W A^T and A A^T, with ``gate`` the
    per-rank scaling s (see the module docstring). (out,)"""
    sb = b * gate  # (out, r): s B
    wa = (weight @ a.to(weight.dtype).T).to(a.dtype)  # (out, r), in the base's dtype
    cross = (wa * sb).sum(1)
    lora = ((sb @ (a @ a.T)) * sb).sum(1)
    return (squares + 2 * cross + lora).clamp_min(0).sqrt()

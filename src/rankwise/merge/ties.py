"""TIES-merging (Yadav et al., arXiv 2306.01708): trim, elect sign, disjoint mean, rank k.

On the weighted task updates τ_t = w_t s_t B_t A_t of one module:
1. trim: keep each τ_t's top ``density`` fraction of entries by magnitude (the paper's top-k%);
2. elect: per entry, the sign of Σ_t τ_t (the sign with the larger total mass);
3. disjoint mean: average, per entry, only the τ_t that are non-zero with the elected sign.
The paper's final scale λ is the user weight: with uniform weights w, the result is w times the
disjoint mean (weights apply before trimming, so a negative weight negates a task). The dense
result is then re-factorised to rank k by SVD.
"""

from __future__ import annotations

import torch

from rankwise.merge.base import DenseMerge, MergeOptions

DEFAULT_DENSITY = 0.2  # the paper's default: keep the top 20% of each task vector


def trim(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries of each task [T, ...]."""
    flat = deltas.flatten(1)  # (T, n)
    keep = int(density * flat.shape[1])
    if keep >= flat.shape[1]:
        return deltas
    top = flat.abs().topk(keep, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
    return (flat * mask).view_as(deltas)


def disjoint_mean(deltas: torch.Tensor) -> torch.Tensor:
    """Elect each entry's sign by total mass, then average the tasks that agree with it."""
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)  # (out, in)
    agree = deltas.sign() == elected  # zeros never agree
    count = agree.sum(dim=0).clamp(min=1)
    return (deltas * agree).sum(dim=0) / count


class TiesMerge(DenseMerge):
    """Trim to the top ``density`` by magnitude, elect signs, disjoint mean; then rank-k SVD."""

    def combine(
        self, deltas: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        density = DEFAULT_DENSITY if options.density is None else options.density
        return disjoint_mean(trim(deltas, density))

"""Linear merging (task arithmetic, arXiv 2212.04089): the weighted sum of the updates, rank k.

    ΔW = Σ_t w_t s_t B_t A_t = [w_1 s_1 B_1, ..., w_T s_T B_T] [A_1; ...; A_T]

The sum is already a product of stacked factors of rank R = Σ r_t, so it is re-factorised to rank k
through QR of the stacked factors and an SVD of an R x R core, never as a dense [out, in] matrix.
Exact when k >= R; otherwise the k largest singular values are kept (the best rank-k fit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rankwise.merge.base import (
    Contribution,
    MergeMethod,
    MergeOptions,
    ModuleMerge,
    factored_svd,
    register,
)


@register("linear")
class LinearMerge(MergeMethod):
    """Σ w_t s_t B_t A_t re-factorised to rank k by SVD."""

    capacity_note = "the sum of the adapters' ranks"

    def capacity(self, parts: Sequence[Contribution]) -> int:
        total = sum(part.rank for part in parts)
        return min(total, parts[0].b.shape[0], parts[0].a.shape[1])

    def merge(
        self, parts: Sequence[Contribution], rank: int, options: MergeOptions, gen: torch.Generator
    ) -> ModuleMerge:
        b = torch.cat([part.coef * part.b for part in parts], dim=1)  # (out, R)
        a = torch.cat([part.a for part in parts], dim=0)  # (R, in)
        return factored_svd(b, a, rank)

"""Linear merging (task arithmetic, arXiv 2212.04089): the weighted sum of the updates, rank k.

    ΔW = Σ_t w_t s_t B_t A_t = U_B (Σ_t M_t) V_Aᵀ

The sum of the cores in core space (``rankwise.merge.core``): exact when k ≥ R = Σ r_t, otherwise
the k largest singular values are kept (the best rank-k fit), never forming a dense update.
"""

from __future__ import annotations

import torch

from rankwise.merge.base import MergeOptions
from rankwise.merge.core import CoreMerge


class LinearMerge(CoreMerge):
    """Σ w_t s_t B_t A_t re-factorised to rank k by SVD."""

    def combine(
        self, cores: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        return cores.sum(dim=0)

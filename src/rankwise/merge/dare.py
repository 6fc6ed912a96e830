"""DARE (Yu et al., arXiv 2311.03099): drop and rescale each task update, then linear or TIES.

Each entry of each weighted task update w_t s_t B_t A_t is dropped with probability p = 1 -
``density`` and the survivors are multiplied by 1 / (1 - p), which keeps every entry's expected
value. ``dare_linear`` then sums the tasks; ``dare_ties`` elects signs and takes TIES's disjoint
mean (the random drop replaces TIES's magnitude trim). Drops come from a generator seeded by
``seed``, so a merge is reproducible. The dense result is re-factorised to rank k by SVD.
"""

from __future__ import annotations

import torch

from rankwise.merge.base import DenseMerge, MergeOptions
from rankwise.merge.ties import disjoint_mean

DEFAULT_DENSITY = 0.5  # keep half; the paper drops up to 90% of full fine-tuning deltas


def drop_and_rescale(deltas: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the survivors by it."""
    if density >= 1:
        return deltas
    keep = torch.rand(deltas.shape, generator=gen, device=deltas.device) < density
    return deltas * keep / density


def dropped(deltas: torch.Tensor, options: MergeOptions, gen: torch.Generator) -> torch.Tensor:
    """The task updates after DARE's drop and rescale at the configured density."""
    density = DEFAULT_DENSITY if options.density is None else options.density
    return drop_and_rescale(deltas, density, gen)


class DareLinearMerge(DenseMerge):
    """DARE, then the sum of the tasks."""

    def combine(
        self, deltas: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        return dropped(deltas, options, gen).sum(dim=0)


class DareTiesMerge(DenseMerge):
    """DARE, then TIES's sign election and disjoint mean."""

    def combine(
        self, deltas: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        return disjoint_mean(dropped(deltas, options, gen))

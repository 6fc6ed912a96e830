"""Iso-C and Iso-CTS (Marczak et al., arXiv 2502.04959): merge with a flat (isotropic) spectrum.

Iso-C: the sum of the task updates, Σ_t τ_t = U diag(σ) Vᵀ, with every singular value replaced
by their mean: ΔW = mean(σ) U Vᵀ. The summed update's spectrum is dominated by a few directions
that the tasks share; flattening it lifts the directions that only one task uses, so no task's
subspace is drowned out.

Iso-CTS adds task-specific directions: keep the top ``common_fraction`` of the dimension from the
sum (the common subspace), fill the rest with each task's top directions outside it (a 1/T share
each, from τ_t minus its projection onto the common left vectors), orthogonalise the stacked left
and right vectors (Procrustes, as TSV-M does) and give every direction the mean of their singular
values.

Choices: both run in core space, and the mean is taken over the *nonzero* singular values only
(the paper's mean over all min(out, in) of a full-rank weight would put a full-rank result's
worth of arbitrary directions into a low-rank update); so the result keeps the rank of the sum
(Iso-C) or of the stacks (Iso-CTS), at most Σ r_t. The "dimension" is the core's, min(p, q). The
nuclear norm (sum of singular values) of the kept directions is unchanged. The paper's scale α is
the adapters' weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.merge.base import MergeOptions
from rankwise.merge.core import CoreMerge, polar, singular_triplets
from rankwise.options import Options, option


def isotropic(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """mean(s) U Vh: the same directions with a flat spectrum."""
    return s.mean() * (u @ vh) if s.numel() else u @ vh


class IsoCMerge(CoreMerge):
    """The summed update with its nonzero singular values replaced by their mean."""

    def combine(
        self, cores: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        return isotropic(*singular_triplets(cores.sum(dim=0)))


@dataclass
class IsoCtsSettings(Options):
    """Iso-CTS's split of the dimension between the common and the task-specific subspaces."""

    common_fraction: float = option(
        0.8, "iso_cts: share of the dimension kept from the summed update (the paper's 0.8)",
        within="(0, 1]",
    )  # fmt: skip


class IsoCtsMerge(CoreMerge):
    """Common subspace of the sum plus each task's own top directions outside it, flattened."""

    settings = IsoCtsSettings

    def combine(
        self, cores: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        dim = min(cores.shape[1:])
        u, s, vh = singular_triplets(cores.sum(dim=0))  # (p, m), (m,), (m, q)
        common = min(s.numel(), max(1, int(options.settings.common_fraction * dim)))
        u, s, vh = u[:, :common], s[:common], vh[:common]
        share = (dim - common) // cores.shape[0]
        us, ss, vhs = [u], [s], [vh]
        for core in cores if share > 0 else []:
            own = core - u @ (u.T @ core)  # the task's update outside the common left subspace
            tu, ts, tvh = singular_triplets(own)
            us.append(tu[:, :share])
            ss.append(ts[:share])
            vhs.append(tvh[:share])
        u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
        return isotropic(polar(u), s, polar(vh.T).T)

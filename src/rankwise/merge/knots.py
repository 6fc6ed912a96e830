"""KnOTS (Stoica et al., arXiv 2410.19735): align the tasks by one joint SVD, then TIES or DARE.

Stack the task updates side by side, [τ_1 … τ_T] = U diag(σ) [V_1ᵀ … V_Tᵀ]: U is one basis all
tasks share, and task t is the block diag(σ) V_tᵀ in it (its aligned right factor, k x in). The
entry-wise merges that fail on unaligned LoRA updates work on these: ``knots_ties`` trims each
block to its top ``density`` entries, elects signs and takes the disjoint mean; ``knots_dare_ties``
drops and rescales instead of trimming. The merged update is U times the merged block.

Runs in core space (the core space paper's KnOTS): the joint SVD is of the stacked cores
[M_1 … M_T] (p x T q) rather than of the dense updates, and the blocks are diag(σ) V_tᵀ in core
coordinates (q columns, not `in`). Numerically zero singular values are dropped (the rank threshold
of ``torch.linalg.matrix_rank``), as the official code drops those below 1e-5.
"""

from __future__ import annotations

import torch

from rankwise.merge.base import MergeOptions
from rankwise.merge.core import CoreMerge, singular_triplets
from rankwise.merge.dare import DEFAULT_DENSITY as DARE_DENSITY
from rankwise.merge.dare import drop_and_rescale
from rankwise.merge.ties import DEFAULT_DENSITY as TIES_DENSITY
from rankwise.merge.ties import disjoint_mean, trim


def aligned(cores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared left basis U [p, k] and each task's block diag(σ) V_tᵀ, [T, k, q]."""
    tasks, _, q = cores.shape
    stacked = torch.cat(list(cores), dim=1)  # (p, T q)
    u, s, vh = singular_triplets(stacked)  # (p, k), (k,), (k, T q)
    blocks = (s[:, None] * vh).view(-1, tasks, q).transpose(0, 1)  # (T, k, q)
    return u, blocks


class KnotsMerge(CoreMerge):
    """Sparsify the aligned blocks (by the subclass's rule), elect signs, take the disjoint mean."""

    uses_density = True
    default_density: float

    def sparsify(self, blocks: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def combine(
        self, cores: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        density = self.default_density if options.density is None else options.density
        u, blocks = aligned(cores)
        return u @ disjoint_mean(self.sparsify(blocks, density, gen))


class KnotsTiesMerge(KnotsMerge):
    """TIES on the aligned blocks: trim each to its top entries."""

    default_density = TIES_DENSITY

    def sparsify(self, blocks: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
        return trim(blocks, density)


class KnotsDareTiesMerge(KnotsMerge):
    """DARE on the aligned blocks: drop entries at random and rescale the rest."""

    default_density = DARE_DENSITY

    def sparsify(self, blocks: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
        return drop_and_rescale(blocks, density, gen)

"""TSV-M (Gargiulo et al., arXiv 2412.00081): task singular vectors, decorrelated, then summed.

Per task, keep the top singular triplets of its update (a 1/T share of the dimension each), stack
the tasks' left vectors side by side and their right vectors likewise, replace each stack by its
nearest orthonormal matrix (orthogonal Procrustes: P Qᵀ of its SVD P Σ Qᵀ), and recombine with
the kept singular values: ΔW = U⊥ diag(σ) V⊥ᵀ. Task interference, measured by the overlap of the
tasks' singular vectors, is removed, and each task keeps its strongest directions and strengths.

Runs in core space (``rankwise.merge.core``): the SVD of a task's core is the SVD of its update
with the bases applied, so the result equals TSV-M on the dense updates. Choices the paper leaves
open here: the "dimension" a task gets 1/T of is the core's, min(p, q) ≤ Σ r_t (the full-rank
weight's dimension would let every task keep its full rank, and the stacks could exceed the
space); it is at least 1. The paper's final scale α is the adapters' weight (all methods here are
linear in it).
"""

from __future__ import annotations

import torch

from rankwise.merge.base import MergeOptions
from rankwise.merge.core import CoreMerge, polar, singular_triplets


def task_singular_vectors(
    cores: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each core's top ``keep`` nonzero triplets, stacked: U [p, K], σ [K], Vh [K, q]."""
    us, ss, vhs = [], [], []
    for core in cores:
        u, s, vh = singular_triplets(core)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


class TsvMerge(CoreMerge):
    """Top 1/T singular triplets per task, orthogonalised stacks of U and V, recombined."""

    def combine(
        self, cores: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        keep = max(1, min(cores.shape[1:]) // cores.shape[0])
        u, s, vh = task_singular_vectors(cores, keep)  # (p, K), (K,), (K, q)
        if s.numel() == 0:
            return cores.sum(dim=0)
        return (polar(u) * s) @ polar(vh.T).T  # (p, q)

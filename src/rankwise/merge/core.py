"""Core space (Panariello et al., arXiv 2509.17786): merge LoRA updates in the small space their
factors span, losslessly, never forming an [out, in] update.

With U_B [out, p] an orthonormal basis of the columns of [c_1 B_1 … c_T B_T] and V_A [in, q] one
of the rows of [A_1; …; A_T] (p, q ≤ R = Σ r_t), every weighted update is exactly

    c_t B_t A_t = U_B M_t V_Aᵀ,   M_t = (U_Bᵀ c_t B_t)(A_t V_A)   [p, q], the task's core.

A method combines the cores into one core M; the merged update U_B M V_Aᵀ is re-factorised by an
SVD of M (at most R x R), so it is an exact PEFT adapter of rank ≤ R, or its best rank-k fit with
the dropped squared singular values reported. Because U_B and V_A are orthonormal, any method
that is linear in the updates or depends only on their singular structure (sums, TSV, Iso) gives
the same result in core space as on dense updates; entry-wise rules (TIES, DARE) act on core
entries, as the paper does.

Choices: the core space is computed in float64 (float32 on MPS, which has none); the bases are
rank-revealing (QR, then an SVD of the small triangular factor, keeping the singular values above
the numerical-rank threshold of ``torch.linalg.matrix_rank``: the largest times eps of the dtype
times the larger side), so duplicated or zero directions are not carried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rankwise.compress.precision import accumulation_dtype
from rankwise.merge.base import Contribution, MergeMethod, MergeOptions, ModuleMerge, split_svd


@dataclass(frozen=True)
class CoreSpace:
    """One module's shared bases and the tasks' cores: c_t B_t A_t = u_b @ cores[t] @ v_a.T."""

    u_b: torch.Tensor  # (out, p), orthonormal columns
    v_a: torch.Tensor  # (in, q), orthonormal columns
    cores: torch.Tensor  # (T, p, q)

    def update(self, core: torch.Tensor) -> torch.Tensor:
        """The dense update of a core, [out, in] (for tests and small checks only)."""
        return self.u_b @ core @ self.v_a.T


def column_basis(m: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [n, p] of the column space of ``m`` [n, R], rank-revealing."""
    q, r = torch.linalg.qr(m)  # (n, R'), (R', R)
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    return q @ u[:, nonzero(s, m.shape)]


def nonzero(s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Which descending singular values of a matrix of ``shape`` are numerically nonzero."""
    if s.numel() == 0:
        return s > 0
    return s > s[0] * max(shape) * torch.finfo(s.dtype).eps


def core_space(parts: Sequence[Contribution]) -> CoreSpace:
    """The bases of the stacked factors and each contribution's core (coefficient folded in).

    In float64 (float32 on MPS, which has none): the matrices are small, and directions of an
    adapter whose update is 1e-6 of another's keep their accuracy.
    """
    dtype = accumulation_dtype(parts[0].a.device)
    a_s, b_s = [part.a.to(dtype) for part in parts], [part.b.to(dtype) for part in parts]
    u_b = column_basis(torch.cat(b_s, dim=1))  # (out, p)
    v_a = column_basis(torch.cat(a_s, dim=0).T)  # (in, q)
    cores = torch.stack(
        [part.coef * (u_b.T @ b) @ (a @ v_a) for part, a, b in zip(parts, a_s, b_s, strict=True)]
    )
    return CoreSpace(u_b, v_a, cores)  # cores: (T, p, q)


def from_core(space: CoreSpace, core: torch.Tensor, rank: int) -> ModuleMerge:
    """The update u_b core v_aᵀ as a rank-``rank`` pair, through an SVD of the small core."""
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (p, m), (m,), (m, q)
    return split_svd(space.u_b @ u, s, vh @ space.v_a.T, rank)


def singular_triplets(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a core with only its numerically nonzero singular values: (U, S, Vh)."""
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = nonzero(s, core.shape)
    return u[:, keep], s[keep], vh[keep]


def polar(m: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (orthogonal Procrustes): P Qᵀ of m = P Σ Qᵀ."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


class CoreMerge(MergeMethod):
    """A method that combines the tasks' cores into one core; subclasses define ``combine``."""

    capacity_note = "the sum of the adapters' ranks"

    def capacity(self, parts: Sequence[Contribution]) -> int:
        total = sum(part.rank for part in parts)
        return min(total, parts[0].b.shape[0], parts[0].a.shape[1])

    def merge(
        self, parts: Sequence[Contribution], rank: int, options: MergeOptions, gen: torch.Generator
    ) -> ModuleMerge:
        space = core_space(parts)
        return from_core(space, self.combine(space.cores, options, gen), rank)

    def combine(
        self, cores: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        """The merged core [p, q] from the tasks' cores [T, p, q]."""
        raise NotImplementedError(f"{type(self).__name__} does not define combine")

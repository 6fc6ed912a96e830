"""What every merge method shares: one module's inputs, its output, its settings and the SVDs.

A method merges one target module at a time. Its inputs are the adapters that adapt that module
(an adapter without it contributes zero and is left out), each as factors and a coefficient
c_t = w_t * s_t (user weight times LoRA scaling), so that task t's update is c_t B_t A_t. Its
output is a pair (A [k, in], B [out, k]) whose plain product B A is the merged update; the merged
adapter is written with lora_alpha = k, so PEFT's scaling alpha / r is 1 and s B A reproduces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rankwise.options import Options


@dataclass(frozen=True)
class Contribution:
    """One adapter's part in one module: factors A [r, in], B [out, r] and coefficient c = w s.

    ``gram`` is E[x xᵀ] [in, in] of the module's inputs on this adapter's task, for the methods
    that read calibration data (RegMean); None where the merge has none.
    """

    a: torch.Tensor
    b: torch.Tensor
    coef: float
    gram: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense update c B A, [out, in]."""
        return self.coef * (self.b @ self.a)


@dataclass
class NoSettings(Options):
    """A method without settings of its own."""


@dataclass(frozen=True)
class MergeOptions:
    """Settings a method may read beyond the rank (randomness comes as a seeded generator)."""

    density: float | None = None  # fraction of each task's entries kept (ties, dare_*, knots_*)
    settings: Options = field(default_factory=NoSettings)  # an instance of the method's settings


@dataclass(frozen=True)
class ModuleMerge:
    """A merged module: B @ A is the update; energies are sums of squares for the report."""

    a: torch.Tensor  # [k, in]
    b: torch.Tensor  # [out, k]
    discarded: float  # energy the method dropped to reach rank k
    total: float  # energy before dropping


class MergeMethod:
    """A merge rule for one module; subclasses override every method."""

    # what bounds the rank this method can produce, for error messages
    capacity_note = ""
    uses_density = False  # whether the method reads MergeOptions.density
    needs_calibration = False  # whether every Contribution must carry its task's input Gram
    settings: type[Options] = NoSettings  # the method's own settings (flat flags and YAML keys)

    def layer_by_layer(self, settings: Options) -> bool:
        """Whether the calibration statistics are measured block by block through the merge."""
        return False

    def capacity(self, parts: Sequence[Contribution]) -> int:
        """The largest rank this method can produce for a module with these contributions."""
        raise NotImplementedError(f"{type(self).__name__} does not define capacity")

    def merge(
        self, parts: Sequence[Contribution], rank: int, options: MergeOptions, gen: torch.Generator
    ) -> ModuleMerge:
        """Merge the contributions into one rank-``rank`` pair."""
        raise NotImplementedError(f"{type(self).__name__} does not define merge")


def split_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> ModuleMerge:
    """Keep the top ``rank`` singular triplets; sqrt(S) goes to each factor so B A = U S Vh."""
    root = s[:rank].sqrt()
    energy = s.square()
    return ModuleMerge(
        a=root[:, None] * vh[:rank],  # (k, in)
        b=u[:, :rank] * root,  # (out, k)
        discarded=float(energy[rank:].sum()),
        total=float(energy.sum()),
    )


def factored_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> ModuleMerge:
    """Truncated SVD of B A (B [out, R], A [R, in]) without forming the [out, in] product.

    QR of both factors, B = Qb Rb and Aᵀ = Qa Ra, leaves B A = Qb (Rb Raᵀ) Qaᵀ, so only the small
    core Rb Raᵀ (at most R x R) needs an SVD; the result is exact when rank >= R.
    """
    qb, rb = torch.linalg.qr(b)  # (out, p), (p, R)
    qa, ra = torch.linalg.qr(a.T)  # (in, q), (q, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (p, q)
    return split_svd(qb @ u, s, vh @ qa.T, rank)


def dense_svd(delta: torch.Tensor, rank: int) -> ModuleMerge:
    """Truncated SVD of a dense update [out, in], from the eigenvectors of its smaller Gram matrix.

    M Mᵀ = U S² Uᵀ gives U and S; then Vhₖ = Sₖ⁻¹ Uₖᵀ M. On a small CPU, LAPACK's SVD of a wide
    [576, 1536] float32 weight took 3-15 s and this eigh 0.2-0.8 s (float64 eigh: 7-25 s). The
    Gram matrix squares the condition number, so singular values below about 3e-4 of the largest
    lose accuracy; the top k that a merge keeps are far above that in practice (measured on
    trained adapters: relative error 4e-7).
    """
    wide = delta.shape[0] <= delta.shape[1]
    m = delta if wide else delta.T  # (p, q), p <= q
    evals, evecs = torch.linalg.eigh(m @ m.T)  # ascending, (p,), (p, p)
    s = evals.flip(0).clamp_min(0).sqrt()  # descending singular values
    u = evecs.flip(1)[:, :rank]  # (p, k)
    top = s[:rank]
    inverse = torch.where(top > 1e-6 * s[0], 1 / top.clamp_min(1e-30), 0.0)
    vh = inverse[:, None] * (u.T @ m)  # (k, q)
    if not wide:  # delta = mᵀ = Vhᵀ S Uᵀ
        u, vh = vh.T, u.T
    return split_svd(u, s, vh, rank)


class DenseMerge(MergeMethod):
    """A method that combines dense per-task updates entry-wise, then re-factorises by SVD."""

    capacity_note = "the smaller side of the largest adapted weight"
    uses_density = True

    def capacity(self, parts: Sequence[Contribution]) -> int:
        return min(parts[0].b.shape[0], parts[0].a.shape[1])

    def merge(
        self, parts: Sequence[Contribution], rank: int, options: MergeOptions, gen: torch.Generator
    ) -> ModuleMerge:
        deltas = torch.stack([part.delta() for part in parts])  # (T, out, in)
        return dense_svd(self.combine(deltas, options, gen), rank)

    def combine(
        self, deltas: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        """Entry-wise merge of weighted task updates [T, out, in] into one update [out, in]."""
        raise NotImplementedError(f"{type(self).__name__} does not define combine")

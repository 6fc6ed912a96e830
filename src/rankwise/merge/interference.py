"""Interference diagnostics: how much adapters' updates collide, module by module, in factor space.

For each module and each pair of adapters (s, t) that adapt it:

- cosine of the updates, ⟨ΔW_s, ΔW_t⟩ / (‖ΔW_s‖ ‖ΔW_t‖), from r x r products only:
  ⟨B_s A_s, B_t A_t⟩ = Σ_ij (B_sᵀ B_t)_ij (A_s A_tᵀ)_ij and ‖B A‖² = Σ_ij (BᵀB)_ij (A Aᵀ)_ij;
- overlap of their input subspaces (row spaces of A) and output subspaces (column spaces of B):
  ‖Q_sᵀ Q_t‖² / min(r_s, r_t) for orthonormal bases Q, the mean squared cosine of the principal
  angles: 1 when one subspace holds the other, 0 when they are orthogonal, about r / d for random
  r-dimensional subspaces of a d-dimensional space.

A large input overlap means both updates act on the same inputs, so summing them changes what
each task's prompts see; that is what merging cannot undo, and what LoRI's frozen random A avoids.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rankwise.adapters import LoraWeights
from rankwise.merge.core import column_basis

Pair = tuple[str, str]


@dataclass(frozen=True)
class PairInterference:
    """One pair of adapters in one module."""

    cosine: float
    input_overlap: float
    output_overlap: float


@dataclass
class InterferenceReport:
    """Per module, per adapter pair: cosine and subspace overlaps; ``table`` prints a summary."""

    modules: dict[str, dict[Pair, PairInterference]]

    def pairs(self) -> dict[Pair, PairInterference]:
        """Each pair's mean over the modules both adapt (|cosine|, overlaps)."""
        grouped: dict[Pair, list[PairInterference]] = {}
        for per_pair in self.modules.values():
            for pair, item in per_pair.items():
                grouped.setdefault(pair, []).append(item)
        return {
            pair: PairInterference(
                sum(abs(i.cosine) for i in items) / len(items),
                sum(i.input_overlap for i in items) / len(items),
                sum(i.output_overlap for i in items) / len(items),
            )
            for pair, items in grouped.items()
        }

    def table(self, worst: int = 5) -> str:
        """Pairs (means over modules), then the modules with the largest input overlap."""
        lines = [f"{'pair':<40}{'|cos|':>8}{'in overlap':>12}{'out overlap':>13}"]
        for (s, t), item in self.pairs().items():
            lines.append(
                f"{s + ' / ' + t:<40}{item.cosine:>8.3f}"
                f"{item.input_overlap:>12.3f}{item.output_overlap:>13.3f}"
            )
        ranked = sorted(
            ((max(i.input_overlap for i in p.values()), m) for m, p in self.modules.items() if p),
            reverse=True,
        )
        if ranked:
            lines.append(f"modules with the largest input overlap (of {len(self.modules)}):")
            lines += [f"  {module}: {value:.3f}" for value, module in ranked[:worst]]
        return "\n".join(lines)


def gram_inner(b_s, a_s, b_t, a_t) -> torch.Tensor:
    """⟨B_s A_s, B_t A_t⟩_F from the small products (r_s x r_t)."""
    return ((b_s.T @ b_t) * (a_s @ a_t.T)).sum()


def overlap(q_s: torch.Tensor, q_t: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between two orthonormal bases."""
    smaller = min(q_s.shape[1], q_t.shape[1])
    return float((q_s.T @ q_t).square().sum() / smaller) if smaller else 0.0


@torch.no_grad()
def interference(adapters: Sequence[LoraWeights], names: Sequence[str]) -> InterferenceReport:
    """The diagnostics of every pair of ``adapters`` (labelled ``names``) in every module."""
    modules: dict[str, dict[Pair, PairInterference]] = {}
    for module in dict.fromkeys(m for w in adapters for m in w.factors):
        present = [(n, w) for n, w in zip(names, adapters, strict=True) if module in w.factors]
        factors = {}
        for name, weights in present:
            a, b = (f.double() for f in weights.factors[module])
            b = weights.scaling(module) * b
            norm = gram_inner(b, a, b, a).clamp_min(0).sqrt()
            factors[name] = (a, b, norm, column_basis(a.T), column_basis(b))
        per_pair = {}
        for (s, (a_s, b_s, n_s, in_s, out_s)), (
            t,
            (a_t, b_t, n_t, in_t, out_t),
        ) in itertools.combinations(factors.items(), 2):
            denominator = float(n_s * n_t)
            cosine = float(gram_inner(b_s, a_s, b_t, a_t)) / denominator if denominator else 0.0
            per_pair[(s, t)] = PairInterference(cosine, overlap(in_s, in_t), overlap(out_s, out_t))
        modules[module] = per_pair
    return InterferenceReport(modules)

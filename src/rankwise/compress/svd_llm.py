"""SVD-LLM (arXiv 2403.07378): truncation-aware whitening by the Cholesky factor of E[x xᵀ]."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from rankwise.compress.base import damped
from rankwise.compress.calibration import GRAM, Statistics
from rankwise.compress.factorizer import Factorizer, Whitening
from rankwise.compress.precision import for_factoring
from rankwise.options import option


@dataclasses.dataclass
class SVDLLM(Factorizer):
    """S with S Sᵀ = E[x xᵀ]: truncating the SVD of W S then minimises E‖(W - W̃) x‖²."""

    name: ClassVar[str] = "svd-llm"
    damping: float = option(
        0.01,
        "added to E[x xᵀ]'s diagonal, relative to its mean, before the Cholesky factor",
        within="[0, inf)",
    )

    def input_kinds(self) -> set[str]:
        return {GRAM}

    def whitening(self, stats: Statistics, key: str) -> Whitening:
        gram = damped(for_factoring(stats.gram[key]), self.damping)
        chol = torch.linalg.cholesky(gram)  # lower triangular
        eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
        return chol, torch.linalg.solve_triangular(chol, eye, upper=False)

"""SVD-LLM (arXiv 2403.07378): truncation-aware whitening by the Cholesky factor of E[x xᵀ]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.compress.base import damped
from rankwise.compress.calibration import GRAM, Statistics
from rankwise.compress.factorizer import Factorizer, Whitening


@dataclass
class SVDLLM(Factorizer):
    """S with S Sᵀ = E[x xᵀ]: truncating the SVD of W S then minimises E‖(W - W̃) x‖²."""

    name: ClassVar[str] = "svd-llm"
    damping: float = 0.01  # added to the diagonal, relative to its mean, before Cholesky

    def input_kinds(self) -> set[str]:
        return {GRAM}

    def whitening(self, stats: Statistics, key: str) -> Whitening:
        chol = torch.linalg.cholesky(damped(stats.gram[key], self.damping))  # lower triangular
        eye = torch.eye(chol.shape[0], dtype=chol.dtype)
        return chol, torch.linalg.solve_triangular(chol, eye, upper=False)

"""ASVD (arXiv 2312.05821): scale input channels by mean|activation|^α before the SVD."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from rankwise.compress.calibration import ABS_MEAN, Statistics
from rankwise.compress.factorizer import Factorizer, Whitening
from rankwise.compress.precision import for_factoring
from rankwise.options import option


@dataclasses.dataclass
class ASVD(Factorizer):
    """S = diag(E|x_j|)^α; the SVD of W S is truncated and S is undone on the first factor."""

    name: ClassVar[str] = "asvd"
    alpha: float = option(
        0.5, "exponent α of the input scaling diag(E|x_j|)^α (0 is plain SVD)", within="[0, inf)"
    )
    epsilon: float = option(
        1e-6, "added to the scales (as ASVD's code does) so S stays invertible", within="(0, inf)"
    )

    def input_kinds(self) -> set[str]:
        return {ABS_MEAN}

    def whitening(self, stats: Statistics, key: str) -> Whitening:
        scales = for_factoring(stats.abs_mean[key]).pow(self.alpha) + self.epsilon  # (in,)
        return torch.diag(scales), torch.diag(scales.reciprocal())

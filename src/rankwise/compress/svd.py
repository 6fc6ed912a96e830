"""Plain truncated SVD of every decoder linear layer; needs no data."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from rankwise.compress.calibration import Statistics
from rankwise.compress.factorizer import Factorizer, Whitening


@dataclasses.dataclass
class SVD(Factorizer):
    """W ≈ U_r Σ_r Vᵀ_r with the factors split as U_r Σ_r^½ and Σ_r^½ V_rᵀ."""

    name: ClassVar[str] = "svd"

    def input_kinds(self) -> set[str]:
        return set()

    def whitening(self, stats: Statistics, key: str) -> Whitening:
        return None, None

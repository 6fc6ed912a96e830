"""Training-free low-rank compensation of a compressed base: EoRA and plain SVD of the error.

EoRA (arXiv 2410.21271) approximates the compression error dW = W - W_c where the layer's
inputs live: with C = E[x x^T] = Q L Q^T from calibration data, it takes the rank-r SVD of
dW Q sqrt(L) and maps it back by sqrt(L)^-1 Q^T, which minimises ||(dW - B A) X|| over rank-r
B A (the activation-weighted error) instead of ||dW - B A||. ``svd`` is the plain truncated SVD
of dW, the baseline EoRA is measured against (a test shows EoRA's weighted error is lower).

Choices the paper leaves open: negative eigenvalues (rounding) are clamped to zero, and
eigenvalues below 1e-8 of the largest are raised to that floor before inverting, so directions
no calibration input reaches get no factor blown up by 1/sqrt(L). The input statistics come from
the compressed model itself: what the adapter will see when it runs on that model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

FLOOR = 1e-8  # relative to the largest eigenvalue of C


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of the rank-r truncated SVD of ``delta``, S split evenly."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def eigenspace(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(L) floored, Q) of C = Q L Q^T (float64)."""
    values, vectors = torch.linalg.eigh(gram.double())
    values = values.clamp_min(0).clamp_min(FLOOR * values.max().clamp_min(1e-30))
    return values.sqrt(), vectors


def eora_factors(
    delta: torch.Tensor, gram: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA's (A [r, in], B [out, r]) for error ``delta`` [out, in] and inputs' E[x x^T]."""
    return eora_in(delta, eigenspace(gram), rank)


def eora_in(
    delta: torch.Tensor, space: tuple[torch.Tensor, torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA's factors in a decomposed eigenspace (layers reading one input share it)."""
    root, vectors = space
    projected = delta.double() @ (vectors * root)  # dW Q sqrt(L), [out, in]
    a, b = svd_factors(projected, rank)
    a = (a / root) @ vectors.T  # back out of the eigenspace: A sqrt(L)^-1 Q^T
    return a.to(delta.dtype), b.to(delta.dtype)


def weighted_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """E||delta x||^2 = tr(delta C delta^T): the error a layer's outputs see."""
    return torch.einsum("oi,ij,oj->", delta.double(), gram.double(), delta.double())


@dataclass(frozen=True)
class Compensator:
    """One ``compensate --method``: what it makes of an input's E[x x^T] (None: it needs no
    statistics), and a layer's factors from its error, that and the rank."""

    prepare: Callable[[torch.Tensor], Any] | None
    factors: Callable[[torch.Tensor, Any, int], tuple[torch.Tensor, torch.Tensor]]


COMPENSATORS: dict[str, Compensator] = {
    "eora": Compensator(eigenspace, eora_in),
    "svd": Compensator(None, lambda delta, _, rank: svd_factors(delta, rank)),
}

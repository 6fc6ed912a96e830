"""EVA, explained variance adaptation (arXiv 2410.07170): A starts as the top right-singular
vectors of the layer's inputs, B at zero, and the ranks move to the layers whose inputs need them.

    C = E[x x^T] - E[x] E[x]^T = Q diag(lambda) Q^T     (the centred inputs' covariance)
    A0 = Q[:, :r_l]^T,  B0 = 0,  ratio_l,i = lambda_i / trace(C)

The rank budget is the sum of the configured ranks; every layer may take up to round(r rho)
components, and the budget goes to the components with the largest explained-variance ratio
over all layers (PEFT's redistribution, ``rho`` its ``EvaConfig.rho``). A layer given no
component is not adapted. Its alpha scales with its new rank, so the scaling s stays alpha / r
(PEFT's ``adjust_scaling_factors``).

The paper and PEFT run an incremental PCA over mini-batches until the components stop moving
(cosine similarity >= tau between consecutive batches). Here each batch adds to exact running
moments; between batches the leading components are refined by subspace iteration from the
previous ones (a few [in, in] x [in, k] products, where a full eigendecomposition of every
layer's covariance per batch would cost more than the forward passes), the same convergence
rule decides when to stop reading data, and the components used are the exact PCA of all the
data read (one eigendecomposition per input at the end).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def covariance(gram: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """E[x x^T] - E[x] E[x]^T from the second moment and the mean."""
    return gram - torch.outer(mean, mean)


def ratios(values: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Explained-variance ratios of eigenvalues (largest first): lambda_i / trace(C)."""
    total = covariance.trace().clamp_min(torch.finfo(covariance.dtype).tiny)
    return values.clamp_min(0) / total


def principal_components(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(components [in, in] as rows, largest first; their explained-variance ratios)."""
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    return vectors.flip(1).T, ratios(values.flip(0), covariance)


def refine(
    covariance: torch.Tensor, components: torch.Tensor, iterations: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k leading components (rows, largest first) and ratios by subspace iteration started
    from ``components`` [k, in], with a Rayleigh-Ritz step to order them."""
    basis = components.T
    for _ in range(iterations):
        basis = torch.linalg.qr(covariance @ basis).Q
    values, vectors = torch.linalg.eigh(basis.T @ covariance @ basis)
    return (basis @ vectors).flip(1).T, ratios(values.flip(0), covariance)


def have_converged(previous: torch.Tensor, current: torch.Tensor, tau: float) -> bool:
    """Whether every component (row) moved less than ``tau`` allows: |cos| >= tau.

    Eigenvectors have no sign, so the cosine is taken in absolute value.
    """
    return bool((torch.nn.functional.cosine_similarity(previous, current).abs() >= tau).all())


def component_caps(ranks: Mapping[str, int], rho: float) -> dict[str, int]:
    """The most components each layer may take: round(r rho)."""
    return {name: round(rank * rho) for name, rank in ranks.items()}


def distribute_ranks(
    ratios: Mapping[str, torch.Tensor], ranks: Mapping[str, int], rho: float
) -> dict[str, int]:
    """Each layer's rank: the budget sum(ranks) goes to the largest explained-variance ratios
    among every layer's first round(r rho) components."""
    caps = component_caps(ranks, rho)
    owners = [name for name in ranks for _ in range(caps[name])]
    values = torch.cat([ratios[name][: caps[name]].double().cpu() for name in ranks])
    chosen = values.argsort(descending=True, stable=True)[: sum(ranks.values())]
    counts = dict.fromkeys(ranks, 0)
    for index in chosen.tolist():
        counts[owners[index]] += 1
    return counts

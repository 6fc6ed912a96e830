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
(cosine similarity >= tau between consecutive batches). Here each batch adds to exact
running moments and the components are the covariance's eigenvectors, so they converge to the
exact PCA of all the data seen; the same convergence rule decides when to stop reading data.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def principal_components(
    gram: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(components [in, in] as rows, largest first; explained-variance ratios) of the inputs
    with second moment ``gram`` = E[x x^T] and mean ``mean`` = E[x]."""
    covariance = gram - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values = values.flip(0).clamp_min(0)
    return vectors.flip(1).T, values / values.sum().clamp_min(torch.finfo(values.dtype).tiny)


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

"""Choosing one configuration per matrix under a storage budget: LQ-LoRA's integer linear program.

LQ-LoRA (arXiv 2311.12023, section 3.2) picks, for every matrix i, one configuration c among K
(bits, block size) so that the summed reconstruction error is least and the summed storage is
within the budget:

    min  sum_ic  cost[i, c] x[i, c]   s.t.  sum_ic  storage[i, c] x[i, c] <= budget,
         sum_c x[i, c] = 1 for every i,   x binary.

The official code solves it with Gurobi (or ``scipy.optimize.milp``); here ``scipy.optimize.milp``
(HiGHS). Costs are divided by their total and storage by the budget before solving, so the
solver's tolerances act on numbers near one; the chosen configurations' storage is then checked
against the budget exactly.
"""

from __future__ import annotations

import numpy as np

from rankwise.errors import RankwiseError


def allocate(costs: np.ndarray, storage: np.ndarray, budget: float) -> np.ndarray:
    """The configuration index of each matrix (N,) minimising ``costs`` [N, K] within budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    count, options = costs.shape
    cheapest = storage.min(1).sum()
    if cheapest > budget:
        raise RankwiseError(
            f"the budget ({budget:,.0f} bits) is below every matrix's cheapest choice together "
            f"({cheapest:,.0f} bits): raise it, lower the rank, or offer fewer bits"
        )
    scale = max(float(costs.sum()), 1e-30)
    one_each = np.kron(np.eye(count), np.ones((1, options)))  # (N, N K): rows sum x[i, :]
    result = milp(
        c=costs.reshape(-1) / scale,
        constraints=[
            LinearConstraint(storage.reshape(1, -1) / budget, -np.inf, 1.0),
            LinearConstraint(one_each, 1.0, 1.0),
        ],
        integrality=np.ones(count * options),
        bounds=Bounds(0, 1),
    )
    if result.x is None:
        raise RankwiseError(f"the bit allocation found no solution: {result.message}")
    choice = result.x.reshape(count, options).argmax(1)
    if storage[np.arange(count), choice].sum() > budget:  # beyond the solver's tolerance
        raise RankwiseError("the bit allocation's solution exceeds the budget; raise it slightly")
    return choice

"""FedIT (arXiv 2305.05644): FedAvg on A and B separately, the inexact baseline.

The mean of the products is not the product of the means: Σ p_k B_k A_k − B̄ Ā keeps the cross
terms p_j p_k B_j A_k, so the aggregate misses the clients' average update (measured as the
aggregation error).
"""

from __future__ import annotations

from rankwise.fed.base import (
    ClientUpdate,
    GlobalState,
    Method,
    ModuleState,
    same_ranks,
    weighted_mean,
)


class FedIT(Method):
    name = "fedit"
    paper = "2305.05644"
    exact = False
    trains = ("A", "B")

    def aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]
    ) -> GlobalState:
        same_ranks(updates, self.name)
        return {
            module: ModuleState(
                {p: weighted_mean([u.parts[module][p] for u in updates], weights) for p in "AB"},
                ms.scale,
                list(ms.folded),
            )
            for module, ms in state.items()
        }

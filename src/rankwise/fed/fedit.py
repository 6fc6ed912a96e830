"""FedIT (arXiv 2305.05644): FedAvg on A and B separately, the inexact baseline.

The mean of the products is not the product of the means: Σ p_k B_k A_k − B̄ Ā keeps the cross
terms p_j p_k B_j A_k, so the aggregate misses the clients' average update (measured as the
aggregation error).
"""

from __future__ import annotations

from rankwise.fed.base import ClientUpdate, GlobalState, Method, same_ranks


class FedIT(Method):
    name = "fedit"
    paper = "2305.05644"
    exact = False
    trains = ("A", "B")

    def aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]
    ) -> GlobalState:
        """B and A averaged apart (the default rule), once the clients' ranks agree."""
        same_ranks(updates, self.name)
        return super().aggregate(state, updates, weights)

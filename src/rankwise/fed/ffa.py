"""FFA-LoRA (arXiv 2403.12313): A frozen at its shared random init, only B trains and travels.

With one A for every client, Σ p_k B_k A = (Σ p_k B_k) A: averaging B is exact. A is drawn once
from the run's seed (``rankwise.fed.client`` makes it the same on every client) and sent down
like any trained part; only B goes up, half of FedIT's uplink.
"""

from __future__ import annotations

from rankwise.fed.base import ClientUpdate, GlobalState, Method, ModuleState, weighted_mean


class FFA(Method):
    name = "ffa"
    paper = "2403.12313"
    exact = True
    trains = ("B",)

    def aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]
    ) -> GlobalState:
        return {
            module: ModuleState(
                {
                    "A": ms.parts["A"],
                    "B": weighted_mean([u.parts[module]["B"] for u in updates], weights),
                },
                ms.scale,
                list(ms.folded),
            )
            for module, ms in state.items()
        }

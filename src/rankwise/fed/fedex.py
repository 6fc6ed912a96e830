"""FedEx-LoRA (arXiv 2410.09432): FedIT's averages plus the exact residual, the cheap fix.

The clients go on training the averaged factors B̄, Ā, and the residual
Σ p_k s B_k A_k − s B̄ Ā is added to their frozen base, so the global model holds exactly the
average of the clients' updates. The residual is kept as one low-rank pair, the stack
[A_1; ...; A_K; Ā] and [p_1 s B_1, ..., p_K s B_K, −s B̄] (rank (K+1) r), instead of the paper's
dense matrix: it is exact, it is PEFT LoRA, and it is smaller whenever (K+1) r (in + out) is
below in · out.
"""

from __future__ import annotations

import torch

from rankwise.fed.base import (
    ClientUpdate,
    GlobalState,
    Method,
    ModuleState,
    same_ranks,
    weighted_mean,
)


class FedEx(Method):
    name = "fedex"
    paper = "2410.09432"
    exact = True
    trains = ("A", "B")

    def aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]
    ) -> GlobalState:
        same_ranks(updates, self.name)
        new = {}
        for module, ms in state.items():
            a_mean = weighted_mean([u.parts[module]["A"] for u in updates], weights)
            b_mean = weighted_mean([u.parts[module]["B"] for u in updates], weights)
            s = ms.scale
            residual_a = torch.cat([u.parts[module]["A"] for u in updates] + [a_mean])
            residual_b = torch.cat(
                [
                    p * u.scales[module] * u.parts[module]["B"]
                    for u, p in zip(updates, weights, strict=True)
                ]
                + [-s * b_mean],
                dim=1,
            )
            new[module] = ModuleState(
                {"A": a_mean, "B": b_mean}, s, [*ms.folded, (residual_a, residual_b)]
            )
        return new

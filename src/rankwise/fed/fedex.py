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

from rankwise.fed.base import ClientUpdate, GlobalState, ModuleState
from rankwise.fed.fedit import FedIT


class FedEx(FedIT):
    name = "fedex"
    paper = "2410.09432"
    exact = True

    def aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]
    ) -> GlobalState:
        averaged = super().aggregate(state, updates, weights)  # FedIT's B̄ and Ā
        new = {}
        for module, mean in averaged.items():
            a_mean, b_mean, s = mean.parts["A"], mean.parts["B"], mean.scale
            residual_a = torch.cat([u.parts[module]["A"] for u in updates] + [a_mean])
            residual_b = torch.cat(
                [
                    p * u.scales[module] * u.parts[module]["B"]
                    for u, p in zip(updates, weights, strict=True)
                ]
                + [-s * b_mean],
                dim=1,
            )
            new[module] = ModuleState(mean.parts, s, [*mean.folded, (residual_a, residual_b)])
        return new

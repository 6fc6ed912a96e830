"""FLoRA (arXiv 2409.05976): stack the clients' factors, exact for any mix of ranks.

[p_1 s_1 B_1, ..., p_K s_K B_K] [A_1; ...; A_K] = Σ p_k s_k B_k A_k, so the stacked pair (rank
Σ r_k) is the clients' average update exactly whatever their ranks. As in the paper, clients
fold it into their base and start a fresh adapter every round; the global adapter is every
round's stack side by side (rank rounds · Σ r_k), an ordinary PEFT adapter.
"""

from __future__ import annotations

import torch

from rankwise.fed.base import ClientUpdate, GlobalState, Method, ModuleState


class FLoRA(Method):
    name = "flora"
    paper = "2409.05976"
    exact = True
    trains = ("A", "B")

    def restarts(self) -> bool:
        return True

    def aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]
    ) -> GlobalState:
        new = {}
        for module, ms in state.items():
            stack_a = torch.cat([u.parts[module]["A"] for u in updates])  # [Σ r_k, in]
            stack_b = torch.cat(
                [
                    p * u.scales[module] * u.parts[module]["B"]
                    for u, p in zip(updates, weights, strict=True)
                ],
                dim=1,
            )  # [out, Σ r_k]
            new[module] = ModuleState({}, ms.scale, [*ms.folded, (stack_a, stack_b)])
        return new

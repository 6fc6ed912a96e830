"""Fed-SB (arXiv 2502.15436): B and A frozen, only an r×r matrix R trains; R is averaged.

Σ p_k s B R_k A = s B (Σ p_k R_k) A: the mean of R is exact, and a client sends r² numbers per
module whatever the model's width and however many clients there are. B and A come from the
SVD of an initial gradient estimate (LoRA-SB's initialisation): B = U_r, A = V_rᵀ of the
clients' weighted mean gradient of W (an initialisation round, ``fedsb_init``). The paper's
choice for R's start is left open here in favour of R = 0, so the adapter starts as the
identity like plain LoRA; export is B·R and A, a PEFT adapter of rank r.
"""

from __future__ import annotations

import torch

from rankwise.fed.base import GlobalState, Method, ModuleState, weighted_mean


class FedSB(Method):
    name = "fedsb"
    paper = "2502.15436"
    exact = True
    trains = ("R",)

    def downlink(self, state: GlobalState) -> dict[str, torch.Tensor]:
        """Only R after the initialisation round (B and A were sent once, by ``fedsb_init``)."""
        return {f"{module}|R": ms.parts["R"] for module, ms in state.items()}

    def frozen(self, state: GlobalState) -> dict[str, torch.Tensor]:
        """The frozen B and A, sent once: a client keeps them for the later rounds."""
        return {f"{module}|{p}": ms.parts[p] for module, ms in state.items() for p in "AB"}


def fedsb_init(
    gradients: list[dict[str, torch.Tensor]], weights: list[float], rank: int, scale: float
) -> GlobalState:
    """The initial state from the clients' gradient estimates of each W ([out, in])."""
    state = {}
    for module in gradients[0]:
        mean = weighted_mean([g[module].double() for g in gradients], weights)
        u, _, vh = torch.linalg.svd(mean, full_matrices=False)
        dtype = gradients[0][module].dtype
        r = min(rank, u.shape[1])
        state[module] = ModuleState(
            {
                "A": vh[:r].to(dtype).contiguous(),
                "B": u[:, :r].to(dtype).contiguous(),
                "R": torch.zeros(r, r, dtype=dtype, device=mean.device),
            },
            scale,
        )
    return state

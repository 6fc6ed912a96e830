"""KaSA (arXiv 2412.06071): knowledge-aware singular-value adaptation, a policy of the layer.

    W' = W - U_d S_d V_d^T          (the r smallest singular triplets of W dropped, once)
    y  = W' x + b + s B diag(d) A x

The frozen base loses its r least significant singular components (the paper's "noisy",
long-tail knowledge) and the update is written in SVD form with a trained diagonal d of
singular values between A and B (PEFT's ``lora_diag``, started from N(0, 1) as PEFT and the
reference code do; B = 0 keeps the start equal to the truncated base). The paper trains with
two regularisers, beta ||d||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F), which keep the
SVD reading of A and B; rankwise adds them to the loss (``regularisation``), where PEFT leaves
them to the user.

The truncation is PEFT's, so adapters move between the two libraries with the same logits; it
happens when the policy is attached (training or loading), and unlike PEFT the dropped part is
kept and given back when the experts are removed, so the base model is whole again. The
diagonal is applied in rank space, so the forward costs what LoRA's does.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.adapters.layer import LowRankExperts
from rankwise.adapters.policy import Policy
from rankwise.architectures import dense_weight
from rankwise.errors import RankwiseError

PENALTIES = (1e-4, 1e-3)  # (beta, gamma): the reference GLUE settings, PEFT's defaults


class KaSA(Policy):
    """One expert with a trained singular-value diagonal on a base stripped of its r smallest."""

    def __init__(
        self,
        layer: LowRankExperts,
        diagonal: torch.Tensor | None = None,
        beta: float = PENALTIES[0],
        gamma: float = PENALTIES[1],
    ):
        super().__init__()
        if layer.num_experts != 1:
            raise RankwiseError("KaSA adapts a layer with one expert, not a stack of them")
        rank = layer.ranks[0]
        if rank >= min(layer.in_features, layer.out_features):
            raise RankwiseError(
                f"KaSA needs r ({rank}) below min(in, out) = "
                f"{min(layer.in_features, layer.out_features)} of its layer, so W keeps a component"
            )
        start = torch.randn(rank, device=layer.lora_A.device) if diagonal is None else diagonal
        self.diagonal = nn.Parameter(start.detach().to(layer.lora_A).clone())
        self.beta, self.gamma = beta, gamma
        kept = dense_weight(layer.base).float().norm()
        self.dropped = truncate(layer.base, rank)  # (U_d S_d [out, r], V_d^T [r, in]) in fp32
        self.dropped_share = float(self.dropped[0].norm() / kept)  # of W's Frobenius norm

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_diag": self.diagonal}  # PEFT's name

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        return layer.gated(x, layer.rank_gate(None) * self.diagonal, into)

    def regularisation(self, layer: LowRankExperts) -> torch.Tensor:
        """beta ||d||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F), the paper's Eq. 9-11."""
        a, b = layer.lora_A.float(), layer.lora_B.float()
        eye = torch.eye(a.shape[0], device=a.device)
        orthogonality = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
        return self.beta * self.diagonal.float().square().sum() + self.gamma * orthogonality

    def delta(self, layer: LowRankExperts) -> torch.Tensor:
        """s B diag(d) A, [out, in]."""
        return (layer.lora_B * (layer.rank_gate(None) * self.diagonal)) @ layer.lora_A

    def merge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        weight += self.delta(layer).to(weight.dtype)

    def unmerge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        weight -= self.delta(layer).to(weight.dtype)

    @torch.no_grad()
    def restore(self, layer: LowRankExperts) -> None:
        """Give the base back the components the truncation dropped (once)."""
        if self.dropped is not None:
            weight = dense_weight(layer.base)
            weight += (self.dropped[0] @ self.dropped[1]).to(weight.dtype)
            self.dropped = None


@torch.no_grad()
def truncate(base: nn.Module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the ``rank`` smallest singular triplets of the base's weight in place (fp32 SVD);
    returns them as (U_d S_d, V_d^T)."""
    weight = dense_weight(base)  # [out, in], a view for Conv1D
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    keep = s.shape[0] - rank
    weight.copy_(((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype))
    return u[:, keep:] * s[keep:], vh[keep:]

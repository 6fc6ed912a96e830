"""LoLDU and NOLA: frozen factors, a few trained coefficients, saved as the plain LoRA they make.

- ``LoLDU`` (arXiv 2410.13618; official code SKDDJ/LoLDU): W = P L D U (LU with partial
  pivoting, D the pivots, U unit upper triangular). A = U[:r] and B = P L[:, :r] are frozen;
  the diagonal z (started at D[:r]) and one scale sigma (started at alpha / r) train, and W keeps
  W - sigma_0 B diag(D[:r]) A, so the layer starts equal to W. Update: sigma B diag(z) A.
- ``NOLA`` (arXiv 2310.02556; official code UCDvision/NOLA): A = A0 + sum_i alpha_i A_i and
  B = sum_i beta_i B_i over k frozen random bases (uniform in [-1, 1] / sqrt(k), as the official
  code draws them); only alpha and beta train, both from zero, so B starts at zero. The official
  code regenerates the bases from a seed at every forward to save memory; here they are drawn
  once per layer from ``nola_seed`` + the layer's index and kept (k r (in + out) floats per
  layer), which costs memory instead of a random draw per forward. A0 comes from the same
  generator, so a resumed run rebuilds the same frozen parts.

PEFT has neither, so the saved adapter is the plain LoRA of the trained update (LoLDU's as the
rank-2r conversion for the original W, as PiSSA's), loadable anywhere; the coefficients
themselves go beside it (``state``) for an exact ``--resume``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankwise.adapters.init import start_from
from rankwise.adapters.layer import LowRankExperts
from rankwise.adapters.policy import Policy
from rankwise.architectures import dense_weight
from rankwise.errors import RankwiseError


class Coefficients(Policy):
    """A single expert whose factors are frozen and whose update s B A comes from ``factors``."""

    def __init__(self, layer: LowRankExperts):
        super().__init__()
        if layer.num_experts != 1:
            raise RankwiseError(f"{type(self).__name__} adapts a layer with one expert only")
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)

    def factors(self, layer: LowRankExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the current update, s B A (s: the expert's scaling)."""
        raise NotImplementedError

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        a, b = self.factors(layer)
        h = nn.functional.linear(layer.dropout_runs[0](x), a.to(x.dtype))
        gated = (h * layer.rank_scaling.to(h.dtype)).to(into.dtype).reshape(-1, h.shape[-1])
        return torch.addmm(into.reshape(-1, into.shape[-1]), gated, b.to(into.dtype).T).view(
            into.shape
        )

    def saved_factors(
        self, layer: LowRankExperts, expert: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors(layer)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.adapter_params())

    def delta(self, layer: LowRankExperts) -> torch.Tensor:
        a, b = self.factors(layer)
        return (b * layer.rank_scaling) @ a

    def merge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        weight += self.delta(layer).to(weight.dtype)

    def unmerge(self, layer: LowRankExperts, weight: torch.Tensor) -> None:
        weight -= self.delta(layer).to(weight.dtype)


class LoLDU(Coefficients):
    """Frozen LDU factors of W; a trained diagonal and scale (``loldu_diag``, ``loldu_scale``)."""

    def __init__(self, layer: LowRankExperts):
        super().__init__(layer)
        rank, scaling = layer.ranks[0], layer.experts[0].scaling
        p, lower, upper = torch.linalg.lu(dense_weight(layer.base).float())
        pivots = upper.diagonal()
        if (pivots[:rank].abs() < 1e-12).any():
            raise RankwiseError("LoLDU needs W's first r LU pivots to be nonzero")
        a, b = upper[:rank] / pivots[:rank, None], p @ lower[:, :rank]
        start_from(layer, a, b * pivots[:rank])  # W keeps W - s B diag(D_r) A
        with torch.no_grad():
            layer.lora_B.copy_(b)
        self.diagonal = nn.Parameter(pivots[:rank].to(layer.lora_A).clone())
        self.scale = nn.Parameter(torch.tensor(scaling, device=layer.lora_A.device))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"loldu_diag": self.diagonal, "loldu_scale": self.scale}

    def factors(self, layer: LowRankExperts) -> tuple[torch.Tensor, torch.Tensor]:
        gain = self.scale * self.diagonal / layer.rank_scaling  # s B' = sigma B diag(z)
        return layer.lora_A, layer.lora_B * gain


class NOLA(Coefficients):
    """Factors mixed from k frozen random bases by trained coefficients alpha and beta."""

    def __init__(self, layer: LowRankExperts, bases: int, seed: int):
        super().__init__(layer)
        rank, device = layer.ranks[0], layer.lora_A.device
        generator = torch.Generator().manual_seed(seed)  # drawn on the CPU, the same anywhere
        bound = 1.0 / math.sqrt(bases)

        def draw(*shape: int) -> torch.Tensor:
            return ((torch.rand(*shape, generator=generator) * 2 - 1) * bound).to(device)

        with torch.no_grad():  # A0: kaiming-uniform bound 1/sqrt(in), as nn.Linear's
            start = torch.rand(rank, layer.in_features, generator=generator) * 2 - 1
            layer.lora_A.copy_(start / math.sqrt(layer.in_features))
            layer.lora_B.zero_()
        self.register_buffer("basis_a", draw(bases, rank, layer.in_features), persistent=False)
        self.register_buffer("basis_b", draw(bases, layer.out_features, rank), persistent=False)
        self.alpha = nn.Parameter(torch.zeros(bases, device=device))
        self.beta = nn.Parameter(torch.zeros(bases, device=device))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"nola_alpha": self.alpha, "nola_beta": self.beta}

    def factors(self, layer: LowRankExperts) -> tuple[torch.Tensor, torch.Tensor]:
        a = layer.lora_A + torch.einsum("k,kri->ri", self.alpha, self.basis_a)
        return a, layer.lora_B + torch.einsum("k,kor->or", self.beta, self.basis_b)

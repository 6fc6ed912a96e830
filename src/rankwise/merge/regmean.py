"""RegMean (Jin et al., arXiv 2212.09849) in LoRA form: the update that best fits every task's
outputs on its own inputs, still an exact low-rank adapter.

Per linear layer, RegMean solves min_W Σ_t ‖X_t W − X_t W_t‖² (W [in, out] acting as x W), whose
answer is W = (Σ_t G_t)⁻¹ Σ_t G_t W_t with G_t = X_tᵀ X_t, the Gram matrix of task t's inputs
to that layer. The base weight W_0 comes back unchanged (Σ_t G_t G⁻¹ = I), so only the updates
merge; written for an update ΔW_t = c_t B_t A_t [out, in] acting as ΔW x:

    ΔW = Σ_t c_t B_t (A_t G_t G⁻¹),   G = Σ_t G_t

so every B_t is kept and its A_t is re-mixed into A'_t = A_t G_t G⁻¹ [r_t, in]: the merged
update is again a sum of rank-r_t products, merged exactly (or truncated to rank k) in core space
like ``linear``. The paper shrinks the off-diagonal entries of each G_t by ``alpha`` (G_t ->
alpha G_t + (1 − alpha) diag(G_t)), which keeps G well conditioned and moves the result towards
a per-input-feature weighted mean.

Choices: G_t is E[x xᵀ] (a mean over the task's calibration tokens, so every task counts alike
whatever its prompts' length), measured with the task's own adapter attached (the paper's
inputs come from each fine-tuned model); an adapter that does not adapt a module does not weigh
in there; a ridge of 1e-6 times G's mean diagonal keeps the solve defined when alpha is 1.

RegMean++ (``regmean_plus``, arXiv 2508.03121) measures each block's inputs on the model whose
earlier blocks already carry the merged update, so later layers are fitted to what the merged
model really feeds them (``rankwise.merge.calibration.merge_layer_by_layer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rankwise.compress.precision import accumulation_dtype
from rankwise.errors import RankwiseError
from rankwise.merge.base import Contribution, MergeOptions, ModuleMerge
from rankwise.merge.core import CoreMerge
from rankwise.options import Options, option

RIDGE = 1e-6


@dataclass
class RegMeanSettings(Options):
    """RegMean's shrinkage of each task's input correlations."""

    alpha: float = option(
        0.9, "regmean: scale of the off-diagonal entries of each task's input Gram matrix",
        within="[0, 1]",
    )  # fmt: skip
    regmean_plus: bool = option(
        False, "regmean: RegMean++, each block's inputs measured through the merged earlier blocks"
    )


def shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 − alpha) diag(G): off-diagonal entries scaled by alpha."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(gram.diagonal())


def remixed(parts: Sequence[Contribution], alpha: float) -> list[Contribution]:
    """Each contribution with A_t replaced by A_t G_t G⁻¹ (B_t and c_t unchanged)."""
    if any(part.gram is None for part in parts):
        raise RankwiseError("regmean needs calibration data: give one --calib source per adapter")
    dtype = accumulation_dtype(parts[0].a.device)  # G may be ill-conditioned: solve in float64
    grams = [shrunk(part.gram.to(dtype), alpha) for part in parts]  # (in, in) each
    total = sum(grams)
    ridge = RIDGE * total.diagonal().mean().clamp_min(1e-30)
    total = total + ridge * torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
    return [
        Contribution(torch.linalg.solve(total, g @ part.a.to(dtype).T).T, part.b, part.coef)
        for part, g in zip(parts, grams, strict=True)
    ]


class RegMeanMerge(CoreMerge):
    """Keep the B's, re-mix the A's by the tasks' input Gram matrices, then sum exactly."""

    needs_calibration = True
    settings = RegMeanSettings

    def layer_by_layer(self, settings: RegMeanSettings) -> bool:
        return settings.regmean_plus

    def merge(
        self, parts: Sequence[Contribution], rank: int, options: MergeOptions, gen: torch.Generator
    ) -> ModuleMerge:
        return super().merge(remixed(parts, options.settings.alpha), rank, options, gen)

    def combine(
        self, cores: torch.Tensor, options: MergeOptions, gen: torch.Generator
    ) -> torch.Tensor:
        return cores.sum(dim=0)

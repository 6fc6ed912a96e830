"""The low-rank experts layer: one frozen linear map plus a stack of LoRA experts.

    y = W x + b + sum_e g_e(x) * s_e * B_e (A_e (drop_e(x)))

Every method in rankwise is this computation with a different gate rule: plain LoRA is one
expert with g = 1, serving picks one expert per request, routers produce per-token gates and
merging collapses experts offline. The experts' factors are stored concatenated along the rank
axis (``lora_A``: [R, in], ``lora_B``: [out, R] with R = sum of ranks), so the whole stack costs
two matrix products whatever E is, and B_e A_e is never formed per token: gates and scalings are
applied in the R-dimensional rank space between the two products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.init import init_experts, start_from
from rankwise.adapters.policy import Policy, WeightedSum
from rankwise.architectures import dense_weight, is_transposed, linear_shape


@dataclass(frozen=True)
class ExpertSpec:
    """One expert's shape and scale: rank r, alpha, rsLoRA scaling, dropout and init scheme."""

    rank: int
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0
    init: str = "init_a"

    @property
    def scaling(self) -> float:
        """s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA, arXiv 2312.03732); 0 for rank 0."""
        if self.rank == 0:  # an absent expert (a module one of several adapters leaves out)
            return 0.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LinearWrapper(nn.Module):
    """A module that wraps one frozen linear map, kept as ``base`` (adapters see the base)."""

    base: nn.Module


class LowRankExperts(LinearWrapper):
    """Wraps a linear map (kept frozen as ``base``) with E low-rank experts.

    ``base`` is an ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored [in, out]); the factors
    have the same shapes either way (A [R, in], B [out, R]), as in PEFT.

    The output is ``policy(layer, x, gates, y)``: a module that decides how the experts combine
    gets x in the base's dtype and the base output y, and returns y plus the low-rank term.
    The default ``WeightedSum`` takes its gates from, in order: the ``gates`` argument of
    ``forward`` (a tensor [..., E] per token, or [E]), else ``expert_weights`` (a static buffer
    [E], ones by default: a plain sum). Routers (per-token gates from x) and the
    serving engine (one adapter per sequence) are other policies over the same factors.
    """

    def __init__(
        self,
        base: nn.Module,
        experts: Sequence[ExpertSpec],
        policy: Policy | None = None,
        initial: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        if not experts:
            raise ValueError("LowRankExperts needs at least one expert")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = linear_shape(base)
        self.fan_in_fan_out = is_transposed(base)  # PEFT's name for the [in, out] layout
        self.experts = tuple(experts)
        ranks = [e.rank for e in self.experts]
        total = sum(ranks)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        if base.weight.dtype in (torch.float32, torch.float64):
            factory["dtype"] = base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(total, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, total, **factory))
        # The factors a weight-aware init (PiSSA, OLoRA) took out of W; empty otherwise.
        self.register_buffer("initial_A", torch.empty(0, self.in_features, **factory), False)
        self.register_buffer("initial_B", torch.empty(self.out_features, 0, **factory), False)
        if initial is None:
            init_experts(self)
        else:  # factors a data-driven init computed from W (CorDA): taken out of W
            start_from(self, *initial)
        # Per-rank bookkeeping: which expert owns each rank, and its scaling s_e.
        owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
        scale = torch.tensor([e.scaling for e in self.experts], dtype=torch.float32)[owner]
        self.register_buffer("rank_owner", owner.to(base.weight.device), persistent=False)
        self.register_buffer("rank_scaling", scale.to(**factory), persistent=False)
        self.register_buffer("expert_weights", torch.ones(len(ranks), **factory), persistent=False)
        # Dropout acts on the input of A; consecutive experts with equal rates share one draw,
        # so the usual case (one rate for all) is exactly two matrix products.
        runs: list[tuple[float, int, int]] = []  # (rate, first rank, end rank)
        start = 0
        for expert in self.experts:
            if runs and runs[-1][0] == expert.dropout:
                runs[-1] = (expert.dropout, runs[-1][1], start + expert.rank)
            else:
                runs.append((expert.dropout, start, start + expert.rank))
            start += expert.rank
        self.dropout_runs = nn.ModuleList(
            nn.Dropout(rate) if rate > 0 else nn.Identity() for rate, _, _ in runs
        )
        self.run_slices = [slice(first, end) for _, first, end in runs]
        self.merged = False
        # How the experts' outputs combine; routers and the serving engine swap in their own.
        self.policy = policy if policy is not None else WeightedSum()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def ranks(self) -> list[int]:
        return [e.rank for e in self.experts]

    def expert_slice(self, e: int) -> slice:
        """The rows of ``lora_A`` (columns of ``lora_B``) that hold expert e."""
        start = sum(self.ranks[:e])
        return slice(start, start + self.ranks[e])

    def expert_factors(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (A [r, in], B [out, r]) as views into the concatenated factors."""
        rows = self.expert_slice(e)
        return self.lora_A[rows], self.lora_B[:, rows]

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters this layer declares (one source for freezing and saving):
        both factors, and what its policy adds (DoRA's magnitude), by PEFT's names."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, **self.policy.adapter_params()}

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        into = None if self.policy.replaces_base else self.base(x)
        return self.policy(self, x, gates, into)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """x A^T for all experts at once, one product per dropout run (usually one). (..., R)

        The product runs in x's dtype: with a bf16 base the fp32 factors are cast (R x in
        values) rather than the activations (tokens x in), as mixed-precision training does.
        """
        parts = [
            nn.functional.linear(drop(x), self.lora_A[rows].to(x.dtype))
            for drop, rows in zip(self.dropout_runs, self.run_slices, strict=True)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def up(self, h: torch.Tensor, rank_gate: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """into + (rank_gate * h) B^T: gated rank space (..., R) to the output (..., out).

        The gate ([R] or [..., R]) is applied in rank space in h's dtype and the product runs in
        the output's; one ``addmm`` adds it to ``into`` (the base output), which saves a pass
        over the output against a separate add.
        """
        b = self.lora_B.to(into.dtype).T
        gated = (h * rank_gate.to(h.dtype)).to(into.dtype).reshape(-1, h.shape[-1])
        return torch.addmm(into.reshape(-1, into.shape[-1]), gated, b).view(into.shape)

    def gated(self, x: torch.Tensor, rank_gate: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """into + B (rank_gate * A x): the experts' sum with a gate per rank, in x's dtype."""
        return self.up(self.down(x), rank_gate, into)

    def expert_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """Each expert's output from rank-space activations, one product per expert.

        (..., R) -> (..., E, out); a hook for policies that transform experts' outputs. Experts
        of one rank take a single batched product.
        """
        num, rank = self.num_experts, self.ranks[0]
        if self.ranks == [rank] * num:  # one product batched over experts, not over tokens
            b = self.lora_B.to(h.dtype).view(-1, num, rank)  # (out, E, r)
            return torch.einsum("...er,oer->...eo", h.unflatten(-1, (num, rank)), b)
        return torch.stack(
            [
                h[..., self.expert_slice(e)] @ self.expert_factors(e)[1].T
                for e in range(len(self.experts))
            ],
            dim=-2,
        )

    def rank_gate(self, gates: torch.Tensor | None) -> torch.Tensor:
        """Per-rank multiplier g_e * s_e, shape [R] or [..., R] for per-token gates."""
        if gates is None:
            return self.expert_weights[self.rank_owner] * self.rank_scaling
        return gates.to(self.rank_scaling.dtype)[..., self.rank_owner] * self.rank_scaling

    @property
    def residual(self) -> bool:
        """Whether a weight-aware init left W - s B0 A0 in ``base`` (see ``restore_base``)."""
        return self.initial_A.numel() > 0

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put back into ``base`` what a weight-aware init took out (s B0 A0), once."""
        if self.residual:
            weight = dense_weight(self.base)
            update = (self.initial_B * self.rank_gate(None)) @ self.initial_A
            weight += update.to(weight.dtype)
            self.initial_A = self.initial_A[:0]
            self.initial_B = self.initial_B[:, :0]

    def delta_weight(self) -> torch.Tensor:
        """The dense update sum_e w_e s_e B_e A_e with the static expert weights, [out, in]."""
        return (self.lora_B * self.rank_gate(None)) @ self.lora_A

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the experts into ``base.weight`` as the policy says; forward then skips them."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        self.policy.merge(self, dense_weight(self.base))  # [out, in], a view for Conv1D
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W is restored to within float rounding (about 1e-7 relative, fp32)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self.policy.unmerge(self, dense_weight(self.base))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, "
            f"scalings={[round(e.scaling, 4) for e in self.experts]}"
        )

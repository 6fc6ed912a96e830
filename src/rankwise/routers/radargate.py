"""RadarGate (arXiv 2505.23184, "Two Is Better Than One: Rotations Scale LoRAs").

A weighted sum of expert outputs stays inside their convex cone; RadarGate also rotates each
expert's output o_e by an input-dependent angle theta_e(x). Each o_e is first fused with the
other experts' outputs by a learnable mixing f_e = sum_j M_ej o_j; the rotation acts in the
plane spanned by o_e and f_e (a Givens rotation of the output space: orthogonal, identity on
the rest), then a softmax stretch gate w_e(x) scales the rotated outputs:

    y = sum_e w_e(x) R(o_e, f_e, theta_e(x)) o_e

theta starts at zero, so at initialisation RadarGate is a softmax-weighted sum of experts.
The forward never forms the experts' outputs: each rotated output lies in the plane of o_e and
f_e, so the whole sum reduces to per-expert coefficients applied in rank space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.options import option
from rankwise.routers.base import ExpertOptions, Router, equal_experts

EPS = 1e-12
TINY = torch.finfo(torch.float32).tiny  # floor of a squared area, before its rsqrt


def plane_basis(o: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal u along o and v along the part of f orthogonal to o. (..., d) each"""
    u = o / o.norm(dim=-1, keepdim=True).clamp_min(EPS)
    rest = f - (f * u).sum(-1, keepdim=True) * u
    return u, rest / rest.norm(dim=-1, keepdim=True).clamp_min(EPS)


def rotate(o: torch.Tensor, f: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """o turned by theta toward f in their plane: cos(theta) o + sin(theta) |o| v. (..., d)"""
    _, v = plane_basis(o, f)
    angle = theta.unsqueeze(-1)
    return torch.cos(angle) * o + torch.sin(angle) * o.norm(dim=-1, keepdim=True) * v


def rotation_matrix(o: torch.Tensor, f: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The rotation ``rotate`` applies, as a [d, d] matrix (one vector pair, for checks)."""
    u, v = plane_basis(o, f)
    eye = torch.eye(o.shape[-1], dtype=o.dtype)
    plane = torch.outer(u, u) + torch.outer(v, v)
    turn = torch.outer(v, u) - torch.outer(u, v)
    return eye + (torch.cos(theta) - 1) * plane + torch.sin(theta) * turn


def pair_angles(outputs: torch.Tensor) -> torch.Tensor:
    """Mean angle (radians) between every pair of experts' outputs. (..., E, d) -> [E, E]"""
    unit = outputs / outputs.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cos = torch.einsum("...id,...jd->...ij", unit, unit).clamp(-1, 1)
    return torch.arccos(cos).reshape(-1, *cos.shape[-2:]).mean(0)


@dataclass
class RadarGateOptions(ExpertOptions):
    """RadarGate's settings: E experts of one rank per module, all of them used per token."""

    expert_rank: int = option(
        8, "rank of each expert (scaling lora_alpha / expert_rank)", within="[1, inf)"
    )
    num_experts: int = option(4, "experts per module", within="[1, inf)")


class RadarGate(Router):
    """Stretch (softmax) gates and input-dependent rotations of each expert's output."""

    name = "radargate"
    options = RadarGateOptions

    @classmethod
    def layer_specs(
        cls, model: nn.Module, options: RadarGateOptions
    ) -> dict[str, list[ExpertSpec]]:
        return equal_experts(model, options, options.expert_rank, options.num_experts)

    def __init__(self, layer: LowRankExperts, options: RadarGateOptions, index: int):
        super().__init__()
        num, width = layer.num_experts, layer.in_features
        self.stretch = nn.Linear(width, num, bias=False).to(layer.lora_A)
        self.angle = nn.Linear(width, num).to(layer.lora_A)
        nn.init.zeros_(self.angle.weight)
        nn.init.zeros_(self.angle.bias)
        # Fusion starts as the mean of the other experts' outputs.
        others = (torch.ones(num, num) - torch.eye(num)) / max(num - 1, 1)  # on the CPU, then moved
        self.fuse = nn.Parameter(others.to(layer.lora_A))
        # spread[e, q] = s_e where rank q belongs to expert e, else 0: h * spread is the
        # block-diagonal [E, R] of the scaled s_e h_e, and c @ spread spreads per-expert
        # coefficients over their ranks with the scalings applied.
        owned = torch.arange(num, device=layer.rank_owner.device)[:, None] == layer.rank_owner
        self.register_buffer("spread", owned * layer.rank_scaling, persistent=False)

    def expert_views(
        self, layer: LowRankExperts, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's output and its rotated version, in the factors' dtype. (..., E, out) each

        The explicit form, for inspection and checks; x of a bf16 base is cast up.
        """
        x = x.to(layer.lora_A.dtype)
        outputs = layer.expert_outputs(layer.down(x) * layer.rank_scaling)  # (..., E, out)
        fused = torch.einsum("ej,...jd->...ed", self.fuse, outputs)
        return outputs, rotate(outputs, fused, self.angle(x))

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        """y + sum_e w_e R(o_e, f_e, theta_e) o_e, in rank space (see ``expert_coefficients``).

        A x, the stretch logits and the angles come from one product (``Router.read``), cast
        to fp32 for the rotation maths; the product with B runs in x's dtype, as a plain
        LoRA's.
        """
        h, logits, theta = self.read(layer, x, self.stretch, self.angle)  # (tokens, R | E | E)
        weights = torch.softmax(logits, dim=-1)
        self.keep_gates(weights, x)
        coefficients = self.expert_coefficients(layer, h, weights, theta)
        return layer.up(h, coefficients @ self.spread, into)

    def expert_coefficients(
        self, layer: LowRankExperts, h: torch.Tensor, weights: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """c with sum_e w_e R(o_e, f_e, theta_e) o_e = sum_j c_j o_j, from h = A x. (tokens, E)

        The rotation keeps o_e in the plane of o_e and f_e = sum_j M_ej o_j, so the rotated
        output is a_e o_e + b_e f_e, with a_e and b_e from the dot products o.o, f.o and f.f
        alone. Each is a quadratic form h^T W h in rank space (``quadratic_forms``), so no
        expert's output is ever materialised: the cost is two products with A and B like a
        plain LoRA, plus O(E R^2) per token. ``rotate`` is the explicit form (a test checks
        they agree).
        """
        sources = (layer.lora_B, self.fuse)
        forms = self.held("forms", lambda: self.quadratic_forms(layer), *sources)  # [R, 3E R]
        num, rank = weights.shape[-1], h.shape[-1]
        values = torch.bmm((h @ forms).view(-1, 3 * num, rank), h.unsqueeze(-1))  # (tokens, 3E, 1)
        oo, fo, ff = values.view(-1, 3 * num).split(num, dim=-1)  # (tokens, E) each
        # With D = oo ff - fo^2 (the squared area spanned by o_e and f_e; |f_e - (fo/oo) o_e|^2
        # = D / oo), the rotated output is a_e o_e + b_e f_e with b_e = sin(theta) oo / sqrt(D)
        # and a_e = cos(theta) - sin(theta) fo / sqrt(D). D is clamped to the smallest normal
        # float, so a zero output (B = 0 at init) gives b_e = 0, a_e = cos(theta) and finite
        # gradients (a test checks them).
        area = torch.addcmul(oo * ff, fo, fo, value=-1).clamp_min(TINY)
        turn = torch.sin(theta) * area.rsqrt()
        a_coef = torch.addcmul(torch.cos(theta), turn, fo, value=-1)
        return torch.addcmul((weights * turn * oo) @ self.fuse, weights, a_coef)

    def quadratic_forms(self, layer: LowRankExperts) -> torch.Tensor:
        """W with (h W)[k R + p] = sum_q h_q W_k[q, p] for the 3E forms h^T W_k h = o_e . o_e,
        f_e . o_e, f_e . f_e. [R, 3E R]

        o_e = B S_e h with S_e = diag(spread[e]) and f_e = B diag((M spread)[e]) h, so every
        form is G * (u v^T) for G = B^T B and u, v rows of spread or M spread.
        """
        b = layer.lora_B
        fused = self.fuse @ self.spread  # (E, R): row e spreads f_e's mix over the ranks
        left = torch.cat([self.spread, fused, fused])  # (3E, R)
        right = torch.cat([self.spread, self.spread, fused])
        forms = (b.T @ b).unsqueeze(1) * left.T.unsqueeze(-1) * right.unsqueeze(0)  # (R, 3E, R)
        return forms.reshape(b.shape[1], -1)

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

import torch
from torch import nn

from rankwise.adapters.layer import LowRankExperts
from rankwise.routers.base import Router, RouterConfig, register

EPS = 1e-12


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


@register
class RadarGate(Router):
    """Stretch (softmax) gates and input-dependent rotations of each expert's output."""

    name = "radargate"

    def __init__(self, layer: LowRankExperts, config: RouterConfig, index: int):
        super().__init__()
        num, width = layer.num_experts, layer.base.in_features
        self.stretch = nn.Linear(width, num, bias=False).to(layer.lora_A)
        self.angle = nn.Linear(width, num).to(layer.lora_A)
        nn.init.zeros_(self.angle.weight)
        nn.init.zeros_(self.angle.bias)
        # Fusion starts as the mean of the other experts' outputs.
        others = (torch.ones(num, num) - torch.eye(num)) / max(num - 1, 1)
        self.fuse = nn.Parameter(others.to(layer.lora_A))
        # blocks[q, e] = s_e where rank q belongs to expert e, else 0: h * blocks is the
        # block-diagonal [R, E] of the scaled s_e h_e, and c @ blocks^T spreads per-expert
        # coefficients over their ranks with the scalings applied.
        owned = layer.rank_owner[:, None] == torch.arange(num, device=layer.rank_owner.device)
        self.register_buffer("blocks", owned * layer.rank_scaling[:, None], persistent=False)
        self.kept_gram: tuple[tuple, torch.Tensor] | None = None  # (key of B, B^T B)

    def expert_views(
        self, layer: LowRankExperts, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's output and its rotated version. (..., E, out) each"""
        outputs = layer.expert_outputs(layer.down(x) * layer.rank_scaling)  # (..., E, out)
        fused = torch.einsum("ej,...jd->...ed", self.fuse, outputs)
        return outputs, rotate(outputs, fused, self.angle(x))

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        """y + sum_e w_e R(o_e, f_e, theta_e) o_e, in rank space (see ``expert_coefficients``).

        The gates and the Gram-matrix maths run in the factors' dtype (fp32), the two products
        in x's, as a plain LoRA's.
        """
        xf = x.to(self.stretch.weight.dtype)
        weights = torch.softmax(self.stretch(xf), dim=-1)  # (..., E)
        self.last_gates = weights.detach()
        h = layer.down(x)  # (..., R): o_e = s_e B_e h_e
        coefficients = self.expert_coefficients(layer, h.to(xf.dtype), weights, self.angle(xf))
        return layer.up(h, coefficients @ self.blocks.T, into)

    def b_gram(self, layer: LowRankExperts, dtype: torch.dtype) -> torch.Tensor:
        """B^T B [R, R]: formed at every training forward, kept between inference forwards.

        Forming it costs out x R^2, more than the rest of a decoding step's routing; B changes
        only through in-place writes (optimizer steps, loading), which bump its version.
        """
        b = layer.lora_B
        if torch.is_grad_enabled() and b.requires_grad:
            b = b.to(dtype)
            return b.T @ b
        key = (b.data_ptr(), b._version, dtype)
        if self.kept_gram is None or self.kept_gram[0] != key:
            frozen = b.detach().to(dtype)
            self.kept_gram = (key, frozen.T @ frozen)
        return self.kept_gram[1]

    def expert_coefficients(
        self, layer: LowRankExperts, h: torch.Tensor, weights: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """c with sum_e w_e R(o_e, f_e, theta_e) o_e = sum_j c_j o_j, from h = A x. (..., E)

        The rotation keeps o_e in the plane of o_e and f_e = sum_j M_ej o_j, so the rotated
        output is a_e o_e + b_e f_e, with a_e and b_e from the dot products o.o, f.o and f.f
        alone. Those come from the Gram matrix G_ij = o_i . o_j = h_i^T B_i^T B_j h_j, formed
        in rank space from B^T B, so no expert's output is ever materialised: the cost is two
        products with A and B like a plain LoRA, plus O(R^2) per token. ``rotate`` is the
        explicit form (a test checks they agree).
        """
        split = h.unsqueeze(-1) * self.blocks  # (..., R, E): column e holds s_e h_e, else 0
        gram = split.transpose(-1, -2) @ (self.b_gram(layer, h.dtype) @ split)  # (..., E, E)
        fuse = self.fuse.to(h.dtype)
        fg = fuse @ gram  # (..., E, E): f_e . o_k
        oo = gram.diagonal(dim1=-2, dim2=-1).clamp_min(EPS**2)  # (..., E): |o_e|^2
        fo = fg.diagonal(dim1=-2, dim2=-1)  # f_e . o_e
        ff = (fg * fuse).sum(-1)  # f_e . f_e = sum_k M_ek f_e . o_k
        # f_e - along * o_e is the part of f_e orthogonal to o_e; its squared norm is
        # ff - 2 along fo + along^2 oo = ff - along fo. Clamped before the square roots, so a
        # zero output (B = 0 at init) has zero gradient.
        along = fo / oo
        rest = torch.addcmul(ff, along, fo, value=-1).clamp_min(EPS**2)  # |f_e - along o_e|^2
        b_coef = torch.sin(theta) * (oo / rest).sqrt()
        a_coef = torch.addcmul(torch.cos(theta), b_coef, along, value=-1)
        return torch.addcmul((weights * b_coef) @ fuse, weights, a_coef)

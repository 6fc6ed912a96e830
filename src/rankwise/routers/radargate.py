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

from collections.abc import Callable
from typing import Any

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
        # spread[e, q] = s_e where rank q belongs to expert e, else 0: h * spread is the
        # block-diagonal [E, R] of the scaled s_e h_e, and c @ spread spreads per-expert
        # coefficients over their ranks with the scalings applied.
        owned = torch.arange(num, device=layer.rank_owner.device)[:, None] == layer.rank_owner
        self.register_buffer("spread", owned * layer.rank_scaling, persistent=False)
        self.kept: dict[str, tuple[tuple, Any]] = {}  # name -> (key of the sources, value)

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

        A x, the stretch logits and the angles come from one product in the factors' dtype
        (fp32; router experts have no dropout, so all three read the same x), as h feeds the
        Gram maths; the product with B runs in x's dtype, as a plain LoRA's. At decoding sizes
        one fp32 product over the concatenated maps, kept between inference forwards, costs
        less than three separate ones (measured on CPU: a bf16 A x alone costs twice as much).
        """
        rank, num = layer.lora_A.shape[0], layer.num_experts
        readers = (layer.lora_A, self.stretch.weight, self.angle.weight, self.angle.bias)
        weight, bias = self.held("readers", lambda: self.joint_reader(layer), *readers)
        joint = nn.functional.linear(x.reshape(-1, x.shape[-1]).to(weight.dtype), weight, bias)
        h, logits, theta = joint.split((rank, num, num), dim=-1)  # (tokens, R | E | E)
        weights = torch.softmax(logits, dim=-1)
        self.last_gates = weights.detach().view(*x.shape[:-1], num)
        coefficients = self.expert_coefficients(layer, h, weights, theta)
        return layer.up(h, coefficients @ self.spread, into)

    def joint_reader(self, layer: LowRankExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight [A; W_stretch; W_angle] and bias [0; 0; b_angle] of the maps reading x."""
        weight = torch.cat([layer.lora_A, self.stretch.weight, self.angle.weight])
        zeros = self.angle.bias.new_zeros(weight.shape[0] - self.angle.bias.shape[0])
        return weight, torch.cat([zeros, self.angle.bias])

    def held(self, name: str, make: Callable[[], Any], *sources: torch.Tensor) -> Any:
        """``make()``: formed at every training forward, kept between inference forwards.

        ``sources`` change only through in-place writes (optimizer steps, loading), which
        bump their version, so the kept value is formed again after any of them.
        """
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return make()
        key = tuple((t.data_ptr(), t._version) for t in sources)
        if name not in self.kept or self.kept[name][0] != key:
            with torch.no_grad():
                self.kept[name] = (key, make())
        return self.kept[name][1]

    def expert_coefficients(
        self, layer: LowRankExperts, h: torch.Tensor, weights: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """c with sum_e w_e R(o_e, f_e, theta_e) o_e = sum_j c_j o_j, from h = A x. (tokens, E)

        The rotation keeps o_e in the plane of o_e and f_e = sum_j M_ej o_j, so the rotated
        output is a_e o_e + b_e f_e, with a_e and b_e from the dot products o.o, f.o and f.f
        alone. Those come from the Gram matrix G_ij = o_i . o_j = h_i^T B_i^T B_j h_j, formed
        in rank space from B^T B, so no expert's output is ever materialised: the cost is two
        products with A and B like a plain LoRA, plus O(R^2) per token. ``rotate`` is the
        explicit form (a test checks they agree).
        """
        split = h.unsqueeze(-2) * self.spread  # (tokens, E, R): row e holds s_e h_e, else 0
        b = layer.lora_B
        b_gram = self.held("b_gram", lambda: b.T @ b, b)  # [R, R]
        gram = torch.bmm(split @ b_gram, split.mT)  # (tokens, E, E), symmetric
        fg = gram @ self.fuse.T  # (tokens, E, E): [k, e] = o_k . f_e
        oo = gram.diagonal(dim1=-2, dim2=-1).clamp_min(EPS**2)  # (tokens, E): |o_e|^2
        fo = fg.diagonal(dim1=-2, dim2=-1)  # f_e . o_e
        ff = (fg * self.fuse.T).sum(-2)  # f_e . f_e = sum_k M_ek o_k . f_e
        # f_e - along * o_e is the part of f_e orthogonal to o_e; its squared norm is
        # ff - 2 along fo + along^2 oo = ff - along fo. Clamped before the square roots, so a
        # zero output (B = 0 at init) has zero gradient.
        along = fo / oo
        rest = torch.addcmul(ff, along, fo, value=-1).clamp_min(EPS**2)  # |f_e - along o_e|^2
        b_coef = torch.sin(theta) * (oo / rest).sqrt()
        a_coef = torch.addcmul(torch.cos(theta), b_coef, along, value=-1)
        return torch.addcmul((weights * b_coef) @ self.fuse, weights, a_coef)

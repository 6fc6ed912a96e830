"""RadarGate (arXiv 2505.23184, "Two Is Better Than One: Rotations Scale LoRAs").

A weighted sum of the experts' outputs v_i = s_i B_i A_i x stays in their convex cone.
RadarGate turns each output before the sum (RotationGate) and scales it (StretchGate):

    y = W x + sum_i g_i(x) R_i(x) v_i

R_i is block diagonal: out/2 rotations of the coordinate pairs (2p, 2p + 1), one angle each, per
expert and token (RoPE's layout, with angles from the data instead of the position; an odd last
coordinate is left as it is). The angles of expert i come from x and from its fused
representation f_i = sum_j M_ij v_j (M learnable: the expert's own output and its relation to the
others), through a generator of rank k (``angle_rank``), so that its cost stays a small multiple
of the experts':

    theta_i = P (Q x + S f_i)      Q [k, in], S [k, out], P [out/2, k]

S f_i = sum_j M_ij (S B_j) h_j is formed in rank space (h = scaled A x), from one product of h with
a [R, E k] matrix derived from S, B and M; Q x comes out of the same product as A x and the
stretch logits. The StretchGate is g = softmax(W_g x), the ``softmax`` router's gate. P starts at
zero, so every angle is zero and a fresh RadarGate is exactly that router's weighted sum.
The rotation needs each expert's output, so the forward forms them, (tokens, E, out), in fp32,
with B's rows in pair-major order so each pair's halves are contiguous, and rotates them with
real products (``turned_sum``); the gate is applied in rank space, before B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.errors import RankwiseError
from rankwise.options import option
from rankwise.routers.base import ExpertOptions, Router, equal_experts

EPS = 1e-12


def rotate_pairs(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """v with each pair (2p, 2p + 1) turned by theta[..., p]; the explicit, real form. (..., out)"""
    p = theta.shape[-1]
    even, odd, rest = v[..., 0 : 2 * p : 2], v[..., 1 : 2 * p : 2], v[..., 2 * p :]
    cos, sin = torch.cos(theta), torch.sin(theta)
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return torch.cat([turned.flatten(-2), rest], dim=-1)


def rotation_matrix(theta: torch.Tensor, width: int) -> torch.Tensor:
    """The [width, width] matrix ``rotate_pairs`` applies for one angle vector (for checks)."""
    even = 2 * torch.arange(theta.shape[-1])
    rot = torch.eye(width, dtype=theta.dtype)
    rot[even, even] = rot[even + 1, even + 1] = torch.cos(theta)
    rot[even, even + 1] = -torch.sin(theta)
    rot[even + 1, even] = torch.sin(theta)
    return rot


def pair_major(b: torch.Tensor, num: int) -> torch.Tensor:
    """B's rows reordered as (even coordinates, odd coordinates, an odd last one) and viewed per
    expert: [out, R] -> (out, E, r), so each expert's output comes out with its pairs' halves
    contiguous (``turned_sum``)."""
    p = b.shape[0] // 2
    return torch.cat([b[0 : 2 * p : 2], b[1 : 2 * p : 2], b[2 * p :]]).view(b.shape[0], num, -1)


def turned_sum(outputs: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """sum_i R(theta_i) o_i from pair-major outputs (``pair_major``). (N, E, out) -> (N, out)

    Pair p of expert i is (e, o) = (o_i[p], o_i[P + p]) in that layout and turns to
    (e cos - o sin, e sin + o cos): real, contiguous products and sums over the experts, a few
    times faster on CPUs than the same rotation as complex products; ``rotate_pairs`` is the
    explicit form (a test compares). The result is back in the natural layout.
    """
    p = theta.shape[-1]
    even, odd = outputs[..., :p], outputs[..., p : 2 * p]
    cos, sin = torch.cos(theta), torch.sin(theta)
    turned = torch.stack(
        [(even * cos - odd * sin).sum(-2), (even * sin + odd * cos).sum(-2)], dim=-1
    ).flatten(-2)
    if 2 * p == outputs.shape[-1]:
        return turned
    return torch.cat([turned, outputs[..., 2 * p :].sum(-2)], dim=-1)


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
    angle_rank: int = option(
        4, "rank k of the angle generator theta_i = P (Q x + S f_i)", within="[1, inf)"
    )


class RadarGate(Router):
    """Softmax stretch gates and input-dependent pairwise rotations of each expert's output."""

    name = "radargate"
    options = RadarGateOptions

    @classmethod
    def layer_specs(
        cls, model: nn.Module, options: RadarGateOptions
    ) -> dict[str, list[ExpertSpec]]:
        return equal_experts(model, options, options.expert_rank, options.num_experts)

    def __init__(self, layer: LowRankExperts, options: RadarGateOptions, index: int):
        super().__init__()
        if len(set(layer.ranks)) != 1:
            raise RankwiseError(f"radargate needs experts of one rank, not {layer.ranks}")
        num, width, out, k = (
            layer.num_experts, layer.in_features, layer.out_features, options.angle_rank,
        )  # fmt: skip
        # Made on the CPU (reproducible anywhere), then moved to the factors' device and dtype.
        self.stretch = nn.Linear(width, num, bias=False).to(layer.lora_A)
        self.angle_in = nn.Linear(width, k, bias=False).to(layer.lora_A)  # Q
        self.angle_out = nn.Linear(out, k, bias=False).to(layer.lora_A)  # S
        self.angle_up = nn.Parameter(torch.zeros(out // 2, k).to(layer.lora_A))  # P: 0
        # Fusion starts as an even mix of the expert's own output and the mean of the others'.
        others = (torch.ones(num, num) - torch.eye(num)) / max(num - 1, 1)
        start = torch.eye(num) if num == 1 else (torch.eye(num) + others) / 2
        self.fuse = nn.Parameter(start.to(layer.lora_A))  # M

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        """y + sum_i g_i R_i v_i: A x, the stretch logits and Q x from one product (fp32 after)."""
        h, logits, q = self.read(layer, x, self.stretch, self.angle_in)  # (N, R | E | k)
        weights = torch.softmax(logits, dim=-1)
        self.keep_gates(weights, x)
        h = h * layer.rank_scaling
        theta = self.angles(layer, h, q)  # (N, E, out // 2)
        # g_i R_i v_i = R_i B_i (g_i h_i): the gate goes on the expert's rank-space activations
        num = layer.num_experts
        gated = h.unflatten(-1, (num, -1)) * weights.unsqueeze(-1).to(h.dtype)
        b = self.held("pair_major", lambda: pair_major(layer.lora_B, num).to(h.dtype), layer.lora_B)
        outputs = torch.einsum("ner,oer->neo", gated, b)  # (N, E, out), pair-major
        return into + turned_sum(outputs, theta).to(into.dtype).view(into.shape)

    def angles(self, layer: LowRankExperts, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """theta (N, E, out // 2) from scaled rank-space h (N, R) and q = Q x (N, k).

        S f_i = sum_j M_ij S B_j h_j for all i is h @ F with F[(j, r), (i, k)] = M_ij (S B_j)[k, r]
        (``fused_map``), so no fused representation is formed in the output space.
        """
        sources = (self.fuse, self.angle_out.weight, layer.lora_B)
        fused = self.held("fused", lambda: self.fused_map(layer), *sources)  # (R, E k)
        z = q.unsqueeze(-2) + (h @ fused).unflatten(-1, (layer.num_experts, -1))  # (N, E, k)
        return z @ self.angle_up.T

    def fused_map(self, layer: LowRankExperts) -> torch.Tensor:
        """F [R, E k]: rank space to every expert's S f_i (see ``angles``)."""
        num, k = layer.num_experts, self.angle_out.weight.shape[0]
        sb = (self.angle_out.weight @ layer.lora_B).view(k, num, -1)  # (k, E, r): S B_j
        return torch.einsum("ij,kjr->jrik", self.fuse, sb).reshape(-1, num * k)

    def expert_views(
        self, layer: LowRankExperts, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's output and its rotated version, in the factors' dtype. (..., E, out) each

        The explicit form, for inspection and checks: the fused representations are formed in
        the output space (f_i = sum_j M_ij v_j) and the angles taken from them directly; x of a
        bf16 base is cast up.
        """
        x = x.to(layer.lora_A.dtype)
        outputs = layer.expert_outputs(layer.down(x) * layer.rank_scaling)  # (..., E, out)
        fused = torch.einsum("ij,...jd->...id", self.fuse, outputs)
        z = self.angle_in(x).unsqueeze(-2) + self.angle_out(fused)  # (..., E, k)
        theta = z @ self.angle_up.T
        return outputs, rotate_pairs(outputs, theta)

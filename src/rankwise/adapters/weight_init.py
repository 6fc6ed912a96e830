"""Weight-aware initialisations: the adapter starts as part of W, and W keeps the residual.

    A0, B0 = f(W);  W_res = W - s B0 A0;  the adapted layer W_res + s B A starts equal to W

- ``pissa`` (arXiv 2404.02948): the top-r singular triplets, A0 = sqrt(S_r / s) V_r^T and
  B0 = U_r sqrt(S_r / s), so the adapter trains the principal components and W_res keeps the
  rest; ``pissa_niter_N`` takes them from a randomized SVD with N subspace iterations (the
  paper's fast variant; ``torch.svd_lowrank``).
- ``olora`` (arXiv 2406.01775): the QR decomposition W = Q R, A0 = R_r (the first r rows),
  B0 = Q_r (the first r columns).

- ``corda_ipm`` / ``corda_kpm`` (CorDA, arXiv 2406.05223): the SVD of W C with C = E[x x^T]
  of the layer's inputs on calibration data, W = U S (V^T C^-1); the instruction-previewed mode
  trains the r largest components (C from the task's data), the knowledge-preserved mode the r
  smallest (C from data whose knowledge W should keep), leaving the others frozen in W_res.
  These need calibration statistics (``rankwise.train.calibrated``), so the factors arrive
  computed (``LowRankExperts(initial=...)``).

All are PEFT's initialisations, formula for formula (tests compare them). The factors are
computed in fp32 on the weight's device; W_res is stored in the base's dtype.

Because W changes, an adapter trained this way only fits W_res. ``saved_factors`` turns it
into a plain LoRA of rank 2r for the original W (PEFT's conversion): s B A - s B0 A0 =
s [B, -B0] [A; A0], with alpha doubled (times sqrt 2 with rsLoRA) so the scaling stays.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

WeightInit = Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]
NITER = re.compile(r"^pissa_niter_(\d+)$")


def pissa(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) from the top-r singular triplets of W [out, in]."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def pissa_fast(niter: int) -> WeightInit:
    """PiSSA from a randomized SVD with ``niter`` subspace iterations."""

    def init(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, v = torch.svd_lowrank(weight, q=rank, niter=niter)
        root = (s / scaling).sqrt()
        return root[:, None] * v.T, u * root

    return init


def olora(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) = (R_r, Q_r) of W = Q R."""
    q, r = torch.linalg.qr(weight)
    return r[:rank].contiguous(), q[:, :rank].contiguous()


def corda(
    weight: torch.Tensor, gram: torch.Tensor, rank: int, scaling: float, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA's (A0, B0) from W [out, in] and the input's second moment C [in, in].

    C is damped as PEFT does (by a share of its mean diagonal, doubled until C C^-1 is within
    0.05 of I) so that its inverse is safe; ``largest`` picks IPM's components, else KPM's.
    """
    c = gram.to(weight.dtype)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    damp = 0.01
    while True:
        fixed = c + damp * c.diagonal().mean() * eye
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye) < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    v = (vh @ inverse).T  # (in, min): W = U S V^T
    keep = slice(None, rank) if largest else slice(-rank, None)
    root = (s[keep] / scaling).sqrt()
    return (v[:, keep] * root).T.contiguous(), (u[:, keep] * root).contiguous()


# Inits whose factors need calibration data (``rankwise.train.calibrated`` computes them):
# CorDA's two modes here, EVA in ``adapters/eva.py``.
DATA_INITS = ("corda_ipm", "corda_kpm", "eva")


# The one place a weight-aware init is registered (``pissa_niter_N`` is parsed from the name).
WEIGHT_INITS: dict[str, WeightInit] = {"pissa": pissa, "olora": olora}


def weight_init(name: str) -> WeightInit | None:
    """The weight-aware init called ``name``, or None if it is not one."""
    found = NITER.match(name)
    return pissa_fast(int(found[1])) if found else WEIGHT_INITS.get(name)


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha of the rank-2r conversion that keeps the scaling alpha / r (or / sqrt(r))."""
    return alpha * (math.sqrt(2) if use_rslora else 2)

"""The serving layer: a frozen linear map plus adapter slots, one slot per sequence of a batch.

    y = W x + b + B_s (A_s x)    for the slot s of x's sequence

``SlotLinear`` declares its slots as two buffers, A [S, R, in] and B^T [S, R, out] (each
adapter's scaling folded into B, zero-padded to the slot rank R, slot 0 zero: no adapter), in
the layout the batched products read: every slot's B^T is contiguous, which measured 2-6x
faster for ``bmm`` than a strided B. How one forward's tokens reach their slots is the plan
that ``plans.Planner`` holds for that forward; the layer runs it on its own buffers.

This is not a ``LowRankExperts``: that layer trains and merges one stack of experts, while the
slots here are written by a pool, never trained, and only summed one slot per sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.adapters.layer import LinearWrapper
from rankwise.architectures import linear_shape
from rankwise.serve.plans import Planner


class SlotLinear(LinearWrapper):
    """Wraps a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` (kept as ``base``) with adapter slots."""

    def __init__(self, base: nn.Module, slots: int, rank: int, planner: Planner):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = linear_shape(base)
        self.planner = planner
        weight = base.weight
        # fp32 slots under a bf16/fp16 base, as LowRankExperts keeps its factors.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        # Not in the state dict: slots are loaded from the pool's host copies, not saved.
        self.register_buffer("a", torch.zeros(slots, rank, self.in_features, **factory), False)
        self.register_buffer("bt", torch.zeros(slots, rank, self.out_features, **factory), False)

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base output plus each token's slot term, computed in the slots' dtype."""
        y = self.base(x)
        out = y.reshape(-1, y.shape[-1]).to(self.a.dtype)  # (N, out); y itself when fp32
        term = self.planner.current()(x.to(self.a.dtype), self.a, self.bt, out)
        return term.view(y.shape).to(y.dtype)

    @torch.no_grad()
    def load(self, slot: int, factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Write (A [r, in], s B^T [r, out]) into ``slot``, zero past rank r; None: zero it."""
        r = 0
        if factors is not None:
            a, bt = factors
            r = a.shape[0]
            self.a[slot, :r].copy_(a)
            self.bt[slot, :r].copy_(bt)
        self.a[slot, r:].zero_()
        self.bt[slot, r:].zero_()

    def extra_repr(self) -> str:
        slots = self.a.shape[0]
        return f"in={self.in_features}, out={self.out_features}, slots={slots}, rank={self.rank}"

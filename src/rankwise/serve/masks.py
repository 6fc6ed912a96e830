"""The 4-D additive attention masks the engine passes to the model.

The engine builds its own masks: its cache is left-padded and shared by sequences of different
lengths. A row's tokens are contiguous and right-aligned in every batch and in the cache.
"""

from __future__ import annotations

import torch


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, the dtype's minimum elsewhere (finite, so no row becomes NaN)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def prefill_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Causal mask over a left-padded prompt batch, [b, 1, p, p], valid [b, p].

    Padding queries attend to themselves only, so their (unused) outputs stay finite.
    """
    cols = torch.arange(valid.shape[1], device=valid.device)
    back = cols[:, None] - cols[None, :]  # (p, p): how far key k lies behind query q
    allowed = ((back >= 0) & valid[:, None, :]) | (back == 0)  # (b, p, p)
    return additive(allowed, dtype)[:, None]


def decode_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask for one new token per row, [rows, 1, 1, width]; valid [rows, width] ends in it."""
    return additive(valid, dtype)[:, None, None, :]

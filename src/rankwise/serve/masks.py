"""The 4-D additive attention masks the engine passes to the model, one per kind of layer.

The engine builds its own masks (its cache is left-padded and shared by sequences of different
lengths), so it must also apply what the model's own mask functions would: the sliding window
of Mistral's layers or of Gemma2's sliding layers (``architectures.attention_windows``). A row's
tokens are contiguous and right-aligned in every batch and in the cache, so the distance between
two columns is the distance between their positions, and a window of w keeps the keys less than
w positions back (``kv > q - w``, as transformers' ``sliding_window_overlay``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Masks = torch.Tensor | dict[str, torch.Tensor]  # what the forward's ``attention_mask`` takes
Windows = dict[str | None, int | None]  # layer type (None: every layer) -> window (None: full)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, the dtype's minimum elsewhere (finite, so no row becomes NaN)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def per_kind(windows: Windows, build: Callable[[int | None], torch.Tensor]) -> Masks:
    """One mask per distinct window, keyed as the forward takes them (a lone None: the mask)."""
    built: dict[int | None, torch.Tensor] = {}
    for window in windows.values():
        if window not in built:
            built[window] = build(window)
    if list(windows) == [None]:
        return built[windows[None]]
    return {kind: built[window] for kind, window in windows.items()}


def prefill_masks(valid: torch.Tensor, dtype: torch.dtype, windows: Windows) -> Masks:
    """Causal masks over a left-padded prompt batch, [b, 1, p, p] each, valid [b, p].

    Padding queries attend to themselves only, so their (unused) outputs stay finite.
    """
    cols = torch.arange(valid.shape[1], device=valid.device)
    back = cols[:, None] - cols[None, :]  # (p, p): how far key k lies behind query q

    def build(window: int | None) -> torch.Tensor:
        near = back >= 0 if window is None else (back >= 0) & (back < window)
        allowed = (near & valid[:, None, :]) | (back == 0)  # (b, p, p)
        return additive(allowed, dtype)[:, None]

    return per_kind(windows, build)


def decode_masks(valid: torch.Tensor, dtype: torch.dtype, windows: Windows) -> Masks:
    """Masks for one new token per row, [rows, 1, 1, width] each; valid [rows, width] ends in it."""
    width = valid.shape[1]

    def build(window: int | None) -> torch.Tensor:
        recent = torch.arange(width, device=valid.device) >= width - window if window else True
        allowed = valid & recent
        return additive(allowed, dtype)[:, None, None, :]

    return per_kind(windows, build)

"""The running batch's KV cache: preallocated, left-padded, rows join and leave between steps.

All rows share one column window ``[lo, hi)``; row i's tokens are right-aligned in it and
``valid[i]`` marks which columns are real (left padding is masked out). A decode step writes
column ``hi`` in place, so a step costs no copy of the cache (transformers' ``DynamicCache``
concatenates, copying the whole cache every step). New sequences are prefilled on their own and
copied in right-aligned; finished rows are dropped by compacting, and columns that no row uses
any more are trimmed from the left. Stale columns keep finite values, so masked positions never
turn attention into NaN. Every buffer lives on the model's device.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlabLayer(DynamicLayer):
    """One decoder layer's keys and values, [rows, heads, columns, dim], in a shared window."""

    def __init__(self, window: Window):
        super().__init__()
        self.window = window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        w = self.window
        q = key_states.shape[-2]
        self.keys[: w.rows, :, w.hi : w.hi + q] = key_states
        self.values[: w.rows, :, w.hi : w.hi + q] = value_states
        return self.keys[: w.rows, :, w.lo : w.hi + q], self.values[: w.rows, :, w.lo : w.hi + q]

    def get_seq_length(self) -> int:
        return self.window.hi - self.window.lo


class Window:
    """The live rows and the shared column window ``[lo, hi)`` of every layer's buffers."""

    def __init__(self) -> None:
        self.rows, self.lo, self.hi = 0, 0, 0


class SlabCache(Cache):
    """KV cache of the running batch, with ``valid`` [rows, columns] marking real tokens."""

    def __init__(self, num_layers: int, max_rows: int, device: torch.device):
        self.window = Window()
        super().__init__(layers=[SlabLayer(self.window) for _ in range(num_layers)])
        self.max_rows = max_rows
        self.valid = torch.zeros(max_rows, 0, dtype=torch.bool, device=device)

    @property
    def rows(self) -> int:
        return self.window.rows

    def next_column(self) -> torch.Tensor:
        """Mark column ``hi`` real for every row: the valid window with it, [rows, width + 1]."""
        w = self.window
        self.reserve(1)
        self.valid[: w.rows, w.hi] = True
        return self.valid[: w.rows, w.lo : w.hi + 1]

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` columns written by the forward that just ran."""
        self.window.hi += tokens

    def join(self, kv: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor) -> None:
        """Append prefilled rows: per layer (keys, values) [b, heads, p, dim] and valid [b, p]."""
        w = self.window
        b, p = valid.shape
        if w.rows + b > self.max_rows:
            raise RuntimeError(f"cache holds {self.max_rows} rows; {w.rows} + {b} requested")
        if w.rows == 0:  # an empty window can start anywhere: leave room for the prompt
            w.lo = w.hi = min(p, self.valid.shape[1])
        grow = max(0, p - (w.hi - w.lo))  # columns to open on the left for a longer prompt
        self.reserve(0, left=grow)
        self.valid[: w.rows, w.lo - grow : w.lo] = False
        w.lo -= grow
        new = slice(w.rows, w.rows + b)
        for layer, (keys, values) in zip(self.layers, kv, strict=True):
            if layer.keys is None:  # first join: buffers shaped after the model's keys
                self.allocate(layer, keys, self.valid.shape[1])
            layer.keys[new, :, w.hi - p : w.hi] = keys
            layer.values[new, :, w.hi - p : w.hi] = values
        self.valid[new, w.lo : w.hi] = False
        self.valid[new, w.hi - p : w.hi] = valid
        w.rows += b

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and trim columns no remaining row uses.

        Only rows whose position changes are copied, so filling holes with the last rows
        (see ``swap_remove``) moves as many rows as left.
        """
        w = self.window
        if not rows:
            self.clear()
            return
        cols = slice(w.lo, w.hi)
        moved = [i for i, row in enumerate(rows) if i != row]  # the places that change row
        if moved:
            device = self.valid.device
            dst = torch.tensor(moved, dtype=torch.long, device=device)
            src = torch.tensor([rows[i] for i in moved], dtype=torch.long, device=device)
            for layer in self.layers:
                if layer.keys is not None:
                    layer.keys[dst, :, cols] = layer.keys[src, :, cols]
                    layer.values[dst, :, cols] = layer.values[src, :, cols]
            self.valid[dst, cols] = self.valid[src, cols]
        w.rows = len(rows)
        used = self.valid[: w.rows, cols].any(0)
        w.lo += int(used.int().argmax())  # first column some row still uses

    def clear(self) -> None:
        """Drop every row. Only the window moves, so this works outside inference mode too."""
        self.window.rows = self.window.lo = self.window.hi = 0

    def reserve(self, right: int, left: int = 0) -> None:
        """Room for ``right`` columns after ``hi`` and ``left`` before ``lo`` (moves if needed)."""
        w = self.window
        capacity = self.valid.shape[1]
        if w.lo >= left and w.hi + right <= capacity:
            return
        width = w.hi - w.lo
        new_capacity = max(capacity, 2 * (left + width + right), 64)
        new_lo = left + (new_capacity - left - width - right) // 4  # slack on both sides
        valid = self.valid.new_zeros(self.max_rows, new_capacity)
        valid[: w.rows, new_lo : new_lo + width] = self.valid[: w.rows, w.lo : w.hi]
        self.valid = valid
        for layer in self.layers:
            if layer.keys is not None:
                old_keys, old_values = layer.keys, layer.values
                self.allocate(layer, old_keys, new_capacity)
                layer.keys[: w.rows, :, new_lo : new_lo + width] = old_keys[
                    : w.rows, :, w.lo : w.hi
                ]
                layer.values[: w.rows, :, new_lo : new_lo + width] = old_values[
                    : w.rows, :, w.lo : w.hi
                ]
        w.lo, w.hi = new_lo, new_lo + width

    def allocate(self, layer: SlabLayer, like: torch.Tensor, columns: int) -> None:
        """Zeroed buffers [max_rows, heads, columns, dim] shaped and typed like ``like``."""
        shape = (self.max_rows, like.shape[1], columns, like.shape[3])
        layer.keys = like.new_zeros(shape)
        layer.values = like.new_zeros(shape)
        layer.dtype, layer.device, layer.is_initialized = like.dtype, like.device, True


def swap_remove(rows: int, leaving: set[int]) -> list[int]:
    """The rows to keep, in their new order: each leaving row's place goes to a last row."""
    order = list(range(rows))
    for gone in sorted(leaving, reverse=True):
        order[gone] = order[-1]
        order.pop()
    return order

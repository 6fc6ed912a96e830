"""Running the model on the batch: ids, positions, masks, the KV cache and the slot plan.

Everything a forward reads is made on the model's device (taken from its parameters): token
ids, positions, masks and the cache, so a model on CUDA serves on CUDA. Each forward runs inside
``Planner.forward``, which gives every slot layer the plan for that forward and clears it after.
New prompts are prefilled together, left-padded, into a ``DynamicCache`` of their own, and the
rows that go on are copied into the running batch's ``SlabCache``; a decode step feeds one token
per running row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from rankwise.architectures import attention_windows
from rankwise.errors import RankwiseError
from rankwise.serve.kv import SlabCache
from rankwise.serve.masks import decode_masks, prefill_masks
from rankwise.serve.plans import Planner

# Attention implementations that take the engine's 4-D additive masks as they are (flash and
# flex attention take other mask forms, which would silently drop padding and windows).
MASKED_ATTENTION = ("eager", "sdpa")


@dataclass
class Prefilled:
    """Keys and values of a prefilled group, waiting to join the batch, with valid [b, p]."""

    cache: DynamicCache
    valid: torch.Tensor


class Runner:
    """The model's forwards over the running batch, whose cache it owns."""

    def __init__(self, model: PreTrainedModel, planner: Planner, max_rows: int, pad: int):
        attention = model.config._attn_implementation
        if attention not in MASKED_ATTENTION:
            raise RankwiseError(
                f"serving passes its own 4-D attention masks, which the {attention} implementation "
                f"does not take; load the model with attn_implementation="
                f"{' or '.join(MASKED_ATTENTION)}"
            )
        self.windows = attention_windows(model.config)
        self.model, self.planner, self.pad = model, planner, pad
        self.device = planner.device  # the model's, as every tensor of a forward
        self.dtype = next(model.parameters()).dtype  # of the additive masks
        self.cache = SlabCache(model.config.num_hidden_layers, max_rows, self.device)

    def forward(self, slots: Sequence[int], cache: Cache, **inputs: torch.Tensor) -> torch.Tensor:
        """Last-position logits [rows, vocab] of one forward with ``slots`` as its plan."""
        with self.planner.forward(slots, inputs["input_ids"].shape[1]):
            output = self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1]

    def prefill(
        self, prompts: Sequence[list[int]], slots: Sequence[int]
    ) -> tuple[torch.Tensor, Prefilled]:
        """Run new prompts together, left-padded: their logits and their keys and values."""
        width = max(len(p) for p in prompts)
        padded = [[self.pad] * (width - len(p)) + p for p in prompts]
        ids = torch.tensor(padded, dtype=torch.long, device=self.device)  # (b, p)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        valid = torch.arange(width, device=self.device) >= width - lengths[:, None]  # (b, p)
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.forward(
            slots,
            cache,
            input_ids=ids,
            attention_mask=prefill_masks(valid, self.dtype, self.windows),
            position_ids=positions,
        )
        return logits, Prefilled(cache, valid)

    def join(self, prefilled: Prefilled, rows: list[int]) -> None:
        """Copy ``rows`` of a prefilled group into the running batch, after its last row."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        kv = [(layer.keys[index], layer.values[index]) for layer in prefilled.cache.layers]
        self.cache.join(kv, prefilled.valid[index])

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]
    ) -> torch.Tensor:
        """One step of every running row: its last token at its position. Logits [rows, vocab]."""
        valid = self.cache.next_column()
        logits = self.forward(
            slots,
            self.cache,
            input_ids=torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None],
            attention_mask=decode_masks(valid, self.dtype, self.windows),
            position_ids=torch.tensor(positions, dtype=torch.long, device=self.device)[:, None],
        )
        self.cache.advance(1)
        return logits

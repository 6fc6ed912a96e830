"""Adapters for serving: folded host copies, and the hot slots every adapted layer holds.

Registered adapters live in host memory with their scaling folded into B. A forward can only
use adapters that sit in a *slot* of the adapted layers; ``SlotPool`` loads them on demand and
evicts the least recently used adapter that no running sequence holds. Slot 0 is the bare base
model and stays zero. Loading an adapter is one copy per adapted layer (timed in ``load_times``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.adapters.inject import inject_experts
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.adapters.peft_format import LoraWeights


@dataclass(eq=False)
class HostAdapter:
    """A registered adapter in host memory: per module (A [r, in], s B [out, r])."""

    name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    @classmethod
    def fold(cls, name: str, weights: LoraWeights) -> HostAdapter:
        """Fold each module's scaling into B, so a slot needs no per-adapter scale."""
        factors = {
            module: (a.float().contiguous(), (weights.scaling(module) * b.float()).contiguous())
            for module, (a, b) in weights.factors.items()
        }
        return cls(name, factors)


class SlotPool:
    """The hot adapters: ``slots`` experts of rank ``rank`` in every adapted layer, LRU-managed."""

    def __init__(self, model: nn.Module, policy: nn.Module, slots: int, rank: int):
        if slots < 2:
            raise ValueError("the pool needs at least 2 slots (slot 0 is the base model)")
        self.model, self.policy, self.slots, self.rank = model, policy, slots, rank
        self.layers: dict[str, LowRankExperts] = {}
        self.lru: OrderedDict[HostAdapter, int] = OrderedDict()  # hot adapter -> slot, oldest first
        self.pins = [0] * slots  # running sequences per slot
        self.load_times: list[float] = []  # seconds per load into a slot

    def acquire(self, adapter: HostAdapter | None) -> int | None:
        """A slot holding ``adapter`` (loaded if needed), pinned for one sequence; None if full."""
        if adapter is None:
            return 0
        slot = self.lru.get(adapter)
        if slot is None:
            slot = self.free_slot()
            if slot is None:
                return None
            self.load(adapter, slot)
        self.lru.move_to_end(adapter)
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """Unpin one sequence's hold on ``slot``."""
        if slot:
            self.pins[slot] -= 1

    def forget(self, adapter: HostAdapter) -> None:
        """Drop an unregistered adapter's slot now unless a running sequence still holds it."""
        slot = self.lru.get(adapter)
        if slot is not None and not self.pins[slot]:
            del self.lru[adapter]

    def free_slot(self) -> int | None:
        """An empty slot, else the least recently used unpinned one (evicted), else None."""
        used = set(self.lru.values())
        for slot in range(1, self.slots):
            if slot not in used:
                return slot
        for adapter, slot in self.lru.items():
            if not self.pins[slot]:
                del self.lru[adapter]
                return slot
        return None

    @torch.no_grad()
    def load(self, adapter: HostAdapter, slot: int) -> None:
        """Copy the adapter into ``slot`` of every adapted layer (zero where it has no module)."""
        start = time.perf_counter()
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        for module, layer in self.layers.items():
            a, b = layer.lora_A[rows], layer.lora_B[:, rows]
            a.zero_()
            b.zero_()
            if module in adapter.factors:
                src_a, src_b = adapter.factors[module]
                a[: src_a.shape[0]].copy_(src_a)
                b[:, : src_b.shape[1]].copy_(src_b)
        self.lru[adapter] = slot
        self.load_times.append(time.perf_counter() - start)

    @torch.no_grad()
    def wrap(self, adapter: HostAdapter) -> None:
        """Give the linear layers ``adapter`` adapts (and no slot yet holds) the zeroed slots."""
        modules = [m for m in adapter.factors if m not in self.layers]
        if not modules:
            return
        spec = ExpertSpec(rank=self.rank, alpha=float(self.rank))  # scaling 1: folded into B
        layers = inject_experts(self.model, {m: [spec] * self.slots for m in modules})
        for layer in layers.values():
            layer.requires_grad_(False)
            layer.lora_A.zero_()
            # B stays [out, R] but column-major (a transposed view of [R, out] storage), so each
            # slot's B^T is contiguous for bmm: measured 2-6x faster than the strided row-major.
            old = layer.lora_B
            b = torch.zeros(old.shape[::-1], dtype=old.dtype, device=old.device).T  # (out, R)
            layer.lora_B = nn.Parameter(b, requires_grad=False)
            layer.policy = self.policy
        self.layers.update(layers)

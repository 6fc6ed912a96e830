"""Adapters for serving: folded host copies, and the hot slots every slot layer holds.

Registered adapters live in host memory with their scaling folded into B, stored as B^T: the
layout of a slot. A forward can only use adapters that sit in a *slot* of the slot layers;
``SlotPool`` loads them on demand and evicts the least recently used adapter that no running
sequence holds. Slot 0 is the bare base model and stays zero. Loading an adapter is one copy
per slot layer (timed in ``load_times``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.adapters.attach import check_compatible
from rankwise.adapters.inject import swap_modules
from rankwise.adapters.peft_format import LoraWeights
from rankwise.serve.layer import SlotLinear
from rankwise.serve.plans import Planner


@dataclass(eq=False)
class HostAdapter:
    """A registered adapter in host memory: per module (A [r, in], s B^T [r, out])."""

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
            module: (a.float().contiguous(), (weights.scaling(module) * b.float()).T.contiguous())
            for module, (a, b) in weights.factors.items()
        }
        return cls(name, factors)


class SlotPool:
    """The hot adapters: ``slots`` slots of rank ``rank`` in every slot layer, LRU-managed."""

    def __init__(self, model: nn.Module, planner: Planner, slots: int, rank: int):
        if slots < 2:
            raise ValueError("the pool needs at least 2 slots (slot 0 is the base model)")
        self.model, self.planner, self.slots, self.rank = model, planner, slots, rank
        self.layers: dict[str, SlotLinear] = {}
        self.lru: OrderedDict[HostAdapter, int] = OrderedDict()  # hot adapter -> slot, oldest first
        self.pins = [0] * slots  # running sequences per slot
        self.load_times: list[float] = []  # seconds per load into a slot

    def check(self, weights: LoraWeights, source: str) -> None:
        """``check_compatible`` against the model's linear maps (the slot layers' bases)."""
        check_compatible(self.model, weights, source)

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

    def unpin_all(self) -> None:
        """No running sequence holds a slot any more (the batch was emptied)."""
        self.pins = [0] * self.slots

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

    def load(self, adapter: HostAdapter, slot: int) -> None:
        """Copy the adapter into ``slot`` of every slot layer (zero where it has no module)."""
        start = time.perf_counter()
        for module, layer in self.layers.items():
            layer.load(slot, adapter.factors.get(module))
        self.lru[adapter] = slot
        self.load_times.append(time.perf_counter() - start)

    def wrap(self, adapter: HostAdapter) -> None:
        """Put slot layers (all slots zero) at the linear maps ``adapter`` adapts and none holds."""
        layers = {
            module: SlotLinear(
                self.model.get_submodule(module), self.slots, self.rank, self.planner
            )
            for module in adapter.factors
            if module not in self.layers
        }
        swap_modules(self.model, layers)
        self.layers.update(layers)

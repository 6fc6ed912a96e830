"""How a mixed batch's low-rank term is computed: one adapter slot per sequence, many per batch.

Every slot layer (``serve.layer.SlotLinear``) holds the same S slots of one padded rank R, as
A [S, R, in] and B^T [S, R, out] with each adapter's scaling folded into B; slot 0 stays zero
(the bare base model). For each forward the ``Planner`` turns the slot of every sequence into a
*plan*, which every slot layer runs on its own buffers; the plan exists for that forward only.

Plans (measured in docs/serving.md, bench/serving.py):

- ``Grouped``: one pair of matrix products per adapter over its tokens. Cheapest when few
  adapters own many tokens (prefill, or one adapter for the whole batch).
- ``SlotMajor``: tokens are scattered into a zero-padded ``[slots, m, in]`` block and two
  ``bmm`` run over the slot range straight on the stacked buffers, so no weight is copied.
  Cheapest when many adapters own a few tokens each (decode with distinct adapters).
- ``Gathered``: each sequence gathers its slot's factors (``A[idx]``: a copy) and two ``bmm``
  follow. Kept as the measured alternative: the gather copies as many bytes as the products read.

The ``auto`` strategy sends adapters with many tokens to ``Grouped`` and the rest to
``SlotMajor`` by a cost estimate, and skips slot 0. Plans are worked out on the host from
Python ints (a few dozen values: no device round trip), and their index tensors are created
once per forward on the model's device.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

# What one Grouped part costs, in rows of a SlotMajor block (measured on SmolLM2's q/v shapes,
# fp32 CPU: about 25 us against 3 us). A block is as tall as its busiest slot, so a busy adapter
# is worth its own products once that saves more block rows than this.
GROUP_ROWS = 8


def indices(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor of ``values`` on ``device``."""
    return torch.tensor(values, dtype=torch.long, device=device)


class Plan:
    """How one forward's low-rank term is computed; built once per forward, run by every layer.

    A plan gets x, the layer's slots (A [S, R, in], B^T [S, R, out]) and ``out`` (N, out), adds
    the term to ``out`` in place and returns it: the base output is a fresh tensor of the
    layer's, so this saves a pass over it and an allocation per layer.
    """

    def __call__(
        self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class NoAdapter(Plan):
    """Every sequence uses the bare base model: the low-rank term is zero."""

    def __call__(
        self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        return out


class Parts(Plan):
    """A sum of parts, each adding the rows of the tokens it owns."""

    def __init__(self, parts: Sequence[Part]):
        self.parts = list(parts)

    def __call__(
        self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, in), N = batch * tokens
        for part in self.parts:
            part.add_to(out, flat, a, bt)
        return out


class Part:
    """Some tokens' low-rank term, added to their rows of ``out`` (``rows`` None: all, in order)."""

    rows: torch.Tensor | None

    def add_to(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> None:
        raise NotImplementedError

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rows is None else x.index_select(0, self.rows)


class Grouped(Part):
    """One adapter's tokens: (x A^T) B^T on just those rows (``rows`` None: every token)."""

    def __init__(self, slot: int, rows: list[int] | None, device: torch.device):
        self.slot = slot
        self.rows = None if rows is None else indices(rows, device)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> None:
        h = self.take(x) @ a[self.slot].T  # (n, R)
        if self.rows is None:
            out.addmm_(h, bt[self.slot])
        else:
            add_rows(out, self.rows, h @ bt[self.slot])


class SlotMajor(Part):
    """Tokens of slots lo..hi-1 placed in a [hi-lo, m, in] block; two bmm on the slot buffers.

    ``rows`` are the tokens' rows of x (None: every token, in order) and ``slots`` their slots.
    When every slot of the range holds exactly m tokens (decoding with distinct adapters: one
    each), the block is a permutation of the tokens: one gather in and one scatter-add out.
    Otherwise the block is zero-padded and its rows are picked out again.
    """

    def __init__(self, rows: list[int] | None, slots: list[int], height: int, device: torch.device):
        self.height = height
        self.lo, self.hi = min(slots), max(slots) + 1
        seen: Counter[int] = Counter()
        where = []  # the block row of each token: its slot's first row plus its rank in the slot
        for slot in slots:
            where.append((slot - self.lo) * height + seen[slot])
            seen[slot] += 1
        self.padded = len(where) < (self.hi - self.lo) * height
        self.rows = None if rows is None else indices(rows, device)
        if self.padded:
            self.where = indices(where, device)
        else:
            order = sorted(range(len(where)), key=where.__getitem__)
            identity = rows is None and order == list(range(len(order)))
            # The row of out of each block row; None: the block is the tokens, in order.
            self.order = None
            if not identity:
                self.order = indices(order if rows is None else [rows[i] for i in order], device)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> None:
        if self.padded:
            x = self.take(x)
            block = x.new_zeros((self.hi - self.lo) * self.height, x.shape[-1])
            block.index_copy_(0, self.where, x)
        else:
            block = x if self.order is None else x.index_select(0, self.order)
        block = block.reshape(self.hi - self.lo, self.height, -1)  # (S', m, in)
        # A (x^T) rather than x A^T: the same product, but read as matrix-vector products it
        # streams A at ~40 GB/s instead of ~28 (measured, 2 cores).
        ht = torch.bmm(a[self.lo : self.hi], block.transpose(1, 2))  # (S', R, m)
        y = torch.bmm(ht.transpose(1, 2), bt[self.lo : self.hi]).flatten(0, 1)  # (S' * m, out)
        if self.padded:
            add_rows(out, self.rows, y.index_select(0, self.where))
        else:
            add_rows(out, self.order, y)


def add_rows(out: torch.Tensor, rows: torch.Tensor | None, y: torch.Tensor) -> None:
    """out[rows] += y in place (rows None: every row, in order)."""
    if rows is None:
        out.add_(y)
    else:
        out.index_add_(0, rows, y)


class Gathered(Plan):
    """Each sequence gathers its slot's factors, then two bmm over the batch (slot 0 included)."""

    def __init__(self, slots: Sequence[int], device: torch.device):
        self.slots = indices(slots, device)

    def __call__(
        self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        h = torch.bmm(x, a[self.slots].transpose(1, 2))  # (B, T, R)
        return out.add_(torch.bmm(h, bt[self.slots]).flatten(0, 1))


def token_slots(slots: Sequence[int], tokens: int) -> list[int]:
    """The slot of every token of a [len(slots), tokens] batch, flattened row-major. (N,)"""
    return [slot for slot in slots for _ in range(tokens)]


def rows_of(per_token: list[int], chosen: set[int]) -> list[int]:
    """The rows whose token uses one of the ``chosen`` slots, in order."""
    return [i for i, slot in enumerate(per_token) if slot in chosen]


def plan_grouped(slots: Sequence[int], tokens: int, device: torch.device) -> Plan:
    """One Grouped part per adapter."""
    per_token = token_slots(slots, tokens)
    groups = {s: rows_of(per_token, {s}) for s in dict.fromkeys(slots) if s}
    return parts([Grouped(s, whole(rows, per_token), device) for s, rows in groups.items()])


def plan_gathered(slots: Sequence[int], tokens: int, device: torch.device) -> Plan:
    """The per-sequence gather (for comparison; never chosen by ``auto``)."""
    return Gathered(slots, device) if any(slots) else NoAdapter()


def plan_auto(slots: Sequence[int], tokens: int, device: torch.device) -> Plan:
    """The busiest adapters get Grouped parts, the rest share one SlotMajor block.

    How many go to Grouped minimises the estimated cost: GROUP_ROWS per part plus the block's
    rows (its slot range times its busiest remaining slot's tokens).
    """
    per_token = token_slots(slots, tokens)
    counts = Counter(s for s in slots if s)
    busiest = sorted(counts, key=lambda s: -counts[s])
    costs = [
        k * GROUP_ROWS + (max(busiest[k:]) - min(busiest[k:]) + 1) * counts[busiest[k]] * tokens
        if k < len(busiest)
        else k * GROUP_ROWS
        for k in range(len(busiest) + 1)
    ]
    heavy = busiest[: costs.index(min(costs))]
    found: list[Part] = [
        Grouped(s, whole(rows_of(per_token, {s}), per_token), device) for s in heavy
    ]
    light = [s for s in busiest if s not in heavy]
    if light:
        rows = rows_of(per_token, set(light))
        height = max(counts[s] for s in light) * tokens
        found.append(
            SlotMajor(whole(rows, per_token), [per_token[i] for i in rows], height, device)
        )
    return parts(found)


def whole(rows: list[int], per_token: list[int]) -> list[int] | None:
    """None when ``rows`` are every token in order (a part then skips its copies), else rows."""
    return None if len(rows) == len(per_token) else rows


def parts(found: list[Part]) -> Plan:
    """The plan summing ``found`` (NoAdapter when no token uses an adapter)."""
    return Parts(found) if found else NoAdapter()


STRATEGIES: dict[str, Callable[[Sequence[int], int, torch.device], Plan]] = {
    "auto": plan_auto,
    "grouped": plan_grouped,
    "gathered": plan_gathered,
}


class Planner:
    """The plan of the forward that is running, shared by every slot layer of one model.

    ``forward(slots, tokens)`` holds the plan for exactly one forward and clears it after, so no
    batch's state outlives its step; a slot layer that runs outside one raises.
    """

    def __init__(self, device: torch.device, strategy: str = "auto"):
        self.device = device
        self.set_strategy(strategy)
        self.plan: Plan | None = None

    def set_strategy(self, strategy: str) -> None:
        """Choose how plans are built: one of STRATEGIES."""
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}"
            )
        self.build = STRATEGIES[strategy]

    @contextmanager
    def forward(self, slots: Sequence[int], tokens: int) -> Iterator[None]:
        """Hold the plan of one forward whose input is [len(slots), tokens], slots[i] row i's."""
        if self.plan is not None:
            raise RuntimeError("a forward is already running on these slot layers")
        self.plan = self.build(slots, tokens, self.device)
        try:
            yield
        finally:
            self.plan = None

    def current(self) -> Plan:
        """The running forward's plan; raises outside ``forward``."""
        if self.plan is None:
            raise RuntimeError("a slot layer ran outside Planner.forward: no slots were chosen")
        return self.plan

"""The serving policy: one adapter per sequence, many adapters in one batch.

Every adapted layer holds the same S hot *slots* as S experts of one padded rank R, with each
adapter's scaling folded into its B, so slot s is ``lora_A.view(S, R, in)[s]`` and
``lora_B.T.view(S, R, out)[s]`` without a copy (``SlotPool`` keeps B column-major, so that
view is contiguous). Slot 0 stays zero: the bare base model. The engine tells the shared
policy which slot each sequence uses once per forward (``set_batch``); the policy then builds
a *plan* and every layer runs it on its own factors.

Plans (measured in docs/serving.md, bench/serving.py):

- ``Grouped``: one pair of matrix products per adapter over its tokens. Cheapest when few
  adapters own many tokens (prefill, or one adapter for the whole batch).
- ``SlotMajor``: tokens are scattered into a zero-padded ``[slots, m, in]`` block and two
  ``bmm`` run over the slot range straight on the stacked factors, so no weight is copied.
  Cheapest when many adapters own a few tokens each (decode with distinct adapters).
- ``Gathered``: each sequence gathers its slot's factors (``A[idx]``: a copy) and two ``bmm``
  follow. Kept as the measured alternative: the gather copies as many bytes as the products read.

The ``auto`` strategy sends adapters with many tokens to ``Grouped`` and the rest to
``SlotMajor`` by a cost estimate, and skips slot 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rankwise.adapters.layer import LowRankExperts

# What one Grouped part costs, in rows of a SlotMajor block (measured on SmolLM2's q/v shapes,
# fp32 CPU: about 25 us against 3 us). A block is as tall as its busiest slot, so a busy adapter
# is worth its own products once that saves more block rows than this.
GROUP_ROWS = 8


def slot_factors(layer: LowRankExperts, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the stacked slots: A as [S, R, in] and B^T as [S, R, out] (scaling folded in)."""
    slots = layer.lora_A.shape[0] // rank
    a = layer.lora_A.view(slots, rank, layer.in_features)  # (S, R, in)
    # (S, R, out): contiguous when B is column-major, as SlotPool stores it
    bt = layer.lora_B.T.view(slots, rank, layer.out_features)
    return a, bt


class Plan:
    """How one forward's low-rank term is computed; built once per forward, run by every layer.

    A plan gets x, the layer's slots (``slot_factors``) and ``out`` (N, out), adds the term to
    ``out`` in place and returns it: the base output is a fresh tensor of the layer's, so this
    saves a pass over it and an allocation per layer.
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
    """One adapter's tokens: (x A^T) B^T on just those rows."""

    def __init__(self, slot: int, rows: torch.Tensor | None):
        self.slot, self.rows = slot, rows

    def add_to(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> None:
        h = self.take(x) @ a[self.slot].T  # (n, R)
        if self.rows is None:
            out.addmm_(h, bt[self.slot])
        else:
            add_rows(out, self.rows, h @ bt[self.slot])


class SlotMajor(Part):
    """Tokens of slots lo..hi-1 placed in a [hi-lo, m, in] block; two bmm on the factors.

    When every slot of the range holds exactly m tokens (decoding with distinct adapters: one
    each), the block is a permutation of the tokens: one gather in and one scatter-add out.
    Otherwise the block is zero-padded and its rows are picked out again.
    """

    def __init__(self, rows: torch.Tensor | None, slots: torch.Tensor, height: int):
        self.rows, self.height = rows, height
        self.lo, self.hi = int(slots.min()), int(slots.max()) + 1
        where = (slots - self.lo) * height + rank_within(slots)  # block row of each token
        self.padded = len(where) < (self.hi - self.lo) * height
        if self.padded:
            self.where = where
        else:
            order = torch.argsort(where)
            identity = rows is None and bool((order == torch.arange(len(order))).all())
            # The row of out of each block row; None: the block is the tokens, in order.
            self.order = None if identity else order if rows is None else rows[order]

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

    def __init__(self, slots: torch.Tensor):
        self.slots = slots

    def __call__(
        self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        h = torch.bmm(x, a[self.slots].transpose(1, 2))  # (B, T, R)
        return out.add_(torch.bmm(h, bt[self.slots]).flatten(0, 1))


def token_slots(slots: Sequence[int], tokens: int) -> torch.Tensor:
    """The slot of every token of a [len(slots), tokens] batch, flattened row-major. (N,)"""
    return torch.tensor(slots, dtype=torch.long).repeat_interleave(tokens)


def plan_grouped(slots: Sequence[int], tokens: int) -> Plan:
    """One Grouped part per adapter."""
    per_token = token_slots(slots, tokens)
    return parts(
        [Grouped(s, (per_token == s).nonzero().squeeze(1)) for s in set(slots) - {0}],
        len(per_token),
    )


def plan_gathered(slots: Sequence[int], tokens: int) -> Plan:
    """The per-sequence gather (for comparison; never chosen by ``auto``)."""
    return Gathered(torch.tensor(slots, dtype=torch.long)) if any(slots) else NoAdapter()


def plan_auto(slots: Sequence[int], tokens: int) -> Plan:
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
    found: list[Part] = [Grouped(s, (per_token == s).nonzero().squeeze(1)) for s in heavy]
    light = [s for s in busiest if s not in heavy]
    if light:
        rows = torch.isin(per_token, torch.tensor(light)).nonzero().squeeze(1)
        found.append(SlotMajor(rows, per_token[rows], max(counts[s] for s in light) * tokens))
    return parts(found, len(per_token))


def parts(found: list[Part], tokens: int) -> Plan:
    """The plan summing ``found``; a part that owns every token, in order, skips the copies."""
    if not found:
        return NoAdapter()
    if len(found) == 1 and len(found[0].rows) == tokens:
        found[0].rows = None  # rows are 0..N-1 in order (nonzero() returns them sorted)
    return Parts(found)


def rank_within(slots: torch.Tensor) -> torch.Tensor:
    """For each entry, how many earlier entries hold the same slot (its row in the block)."""
    order = torch.argsort(slots, stable=True)
    ordered = slots[order]
    counts = torch.bincount(ordered)
    first = torch.cumsum(counts, 0) - counts  # where each slot's run starts in sorted order
    pos = torch.empty_like(slots)
    pos[order] = torch.arange(len(slots)) - first[ordered]
    return pos


STRATEGIES: dict[str, Callable[[Sequence[int], int], Plan]] = {
    "auto": plan_auto,
    "grouped": plan_grouped,
    "gathered": plan_gathered,
}


class AdapterBatch(nn.Module):
    """Policy over ``LowRankExperts`` slots: the engine sets each sequence's slot per forward."""

    def __init__(self, rank: int, strategy: str = "auto"):
        super().__init__()
        self.rank = rank
        self.set_strategy(strategy)
        self.plan: Plan = NoAdapter()
        # Slot views per layer: forming them costs ~9 us a layer, a tenth of a decode step's
        # low-rank work with 32 adapters. Slots are loaded in place, so the views stay valid.
        self.slots: dict[LowRankExperts, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_strategy(self, strategy: str) -> None:
        """Choose how plans are built: one of STRATEGIES."""
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}"
            )
        self.build = STRATEGIES[strategy]

    def set_batch(self, slots: Sequence[int], tokens: int) -> None:
        """Slot of each sequence of the next forward, whose input is [len(slots), tokens]."""
        self.plan = self.build(slots, tokens)

    def forward(
        self, layer: LowRankExperts, x: torch.Tensor, gates: torch.Tensor | None, into: torch.Tensor
    ) -> torch.Tensor:
        """into + the plan's low-rank term, computed in the slots' dtype (fp32).

        ``into`` is the base layer's fresh output and takes the term in place when it is in
        the slots' dtype (serving runs without autograd).
        """
        a, bt = self.slots.get(layer) or (None, None)
        if a is None or a._base is not layer.lora_A:
            a, bt = self.slots[layer] = slot_factors(layer, self.rank)
        out = into.reshape(-1, into.shape[-1]).to(a.dtype)
        return self.plan(x.to(a.dtype), a, bt, out).view(into.shape).to(into.dtype)

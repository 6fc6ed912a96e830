"""``merge_adapters``: LoRA adapters in, one LoRA adapter out, plus a report of what was dropped.

Adapters may differ in rank and in target modules: a module one adapter leaves out counts as a
zero update there. They must come from the same base model: equal ``base_model`` names where
recorded and equal weight shapes for every module they share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from rankwise.adapters import LoraWeights
from rankwise.errors import RankwiseError
from rankwise.merge.base import Contribution, MergeMethod, MergeOptions, ModuleMerge
from rankwise.merge.registry import METHODS

Grams = Mapping[str, torch.Tensor]  # module -> E[x xᵀ] of its inputs on one adapter's task


@dataclass
class MergeReport:
    """Per module: the merged rank and the (discarded, total) energy, sums of squares."""

    method: str
    ranks: dict[str, int]
    energy: dict[str, tuple[float, float]]

    @property
    def discarded(self) -> float:
        """Fraction of the energy dropped over all modules (0 when the merge is exact)."""
        total = sum(t for _, t in self.energy.values())
        return sum(d for d, _ in self.energy.values()) / total if total > 0 else 0.0

    def module_discarded(self) -> dict[str, float]:
        """The dropped fraction of each module's energy."""
        return {m: d / t if t > 0 else 0.0 for m, (d, t) in self.energy.items()}

    def summary(self) -> str:
        """One line: method, ranks, modules and discarded energy (overall and worst module)."""
        ranks = sorted(set(self.ranks.values()))
        worst, fraction = max(self.module_discarded().items(), key=lambda kv: kv[1])
        return (
            f"{self.method}: {len(self.ranks)} modules at rank {'/'.join(map(str, ranks))}, "
            f"discarded energy {100 * self.discarded:.2f}% (worst {worst}: {100 * fraction:.2f}%)"
        )


class MergeResult(NamedTuple):
    """The merged adapter and its report."""

    weights: LoraWeights
    report: MergeReport


@torch.no_grad()
def merge_adapters(
    adapters: Sequence[LoraWeights],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    grams: Sequence[Grams] | None = None,
) -> MergeResult:
    """Merge adapters by ``method`` into one adapter of rank ``rank`` (default: their largest).

    ``weights`` (default all 1) multiply each adapter's update; ``density`` is the fraction of
    entries ties, dare_* and knots_* keep; ``seed`` seeds DARE and LoRA-LEGO; ``names`` label the
    adapters in error messages; ``settings`` are the method's own (``METHODS[m].settings``);
    ``grams`` give, per adapter, its task's input Gram matrix of each module (RegMean). The
    merged adapter has lora_alpha equal to its rank (scaling 1).
    """
    labels = list(names) if names else [f"adapter {i}" for i in range(len(adapters))]
    merger = method_named(method)
    own = merger.settings.from_mapping(settings or {}, f"the settings of {method}")
    coefs = check_weights(adapters, weights)
    check_density(merger, method, density)
    check_plain_lora(adapters, labels)
    check_grams(merger, method, adapters, grams)
    base_model = check_same_base(adapters, labels)
    parts = contributions(adapters, coefs, grams)
    capacity = {module: merger.capacity(p) for module, p in parts.items()}
    rank = check_rank(rank, adapters, capacity, merger, method)
    dtype = common_dtype(adapters)
    first = next(iter(parts.values()))[0].a
    gen = torch.Generator(device=first.device).manual_seed(seed)
    options = MergeOptions(density=density, settings=own)
    merged: dict[str, ModuleMerge] = {
        module: merger.merge(p, min(rank, capacity[module]), options, gen)
        for module, p in parts.items()
    }
    result = LoraWeights(
        factors={m: (r.a.to(dtype), r.b.to(dtype)) for m, r in merged.items()},
        alphas={m: float(r.a.shape[0]) for m, r in merged.items()},
        use_rslora=False,
        dropout=max(w.dropout for w in adapters),
        base_model=base_model,
        fan_in_fan_out=any(w.fan_in_fan_out for w in adapters),
    )
    report = MergeReport(
        method=method,
        ranks={m: r.a.shape[0] for m, r in merged.items()},
        energy={m: (r.discarded, r.total) for m, r in merged.items()},
    )
    return MergeResult(result, report)


def method_named(method: str) -> MergeMethod:
    """The registered merge method called ``method``."""
    if method not in METHODS:
        raise RankwiseError(f"unknown merge method '{method}': choose one of {', '.join(METHODS)}")
    return METHODS[method]


def check_weights(adapters: Sequence[LoraWeights], weights: Sequence[float] | None) -> list[float]:
    """One weight per adapter (default 1 each)."""
    if not adapters:
        raise RankwiseError("merging needs at least one adapter")
    if weights is None:
        return [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise RankwiseError(
            f"got {len(weights)} weights for {len(adapters)} adapters: give one weight per adapter"
        )
    return [float(w) for w in weights]


def check_density(merger: MergeMethod, method: str, density: float | None) -> None:
    """Density is a fraction in (0, 1], and only for methods that drop entries."""
    if density is None:
        return
    if not merger.uses_density:
        users = ", ".join(name for name, m in METHODS.items() if m.uses_density)
        raise RankwiseError(f"density applies to {users}, not to {method}")
    if not 0 < density <= 1:
        raise RankwiseError(f"density must be in (0, 1], got {density}")


def check_plain_lora(adapters: Sequence[LoraWeights], labels: Sequence[str]) -> None:
    """DoRA and KaSA adapters are refused: each changes how its update meets W (DoRA rescales
    W + ΔW per row, KaSA's base drops W's smallest singular triplets), so their updates do not
    add to one plain LoRA update."""
    for label, weights in zip(labels, adapters, strict=True):
        if weights.variant:
            raise RankwiseError(
                f"{label} is a {weights.variant} adapter: merging keeps only plain LoRA updates "
                f"exact ({weights.variant} changes how its update meets W); merge plain LoRA "
                "adapters"
            )


def check_grams(
    merger: MergeMethod, method: str, adapters: Sequence[LoraWeights], grams: Sequence | None
) -> None:
    """Calibration statistics: one set per adapter, for the methods that read them."""
    if grams is None:
        if merger.needs_calibration:
            raise RankwiseError(
                f"{method} needs calibration data: give one --calib source per adapter"
            )
        return
    if len(grams) != len(adapters):
        raise RankwiseError(
            f"got {len(grams)} calibration sources for {len(adapters)} adapters: give one per "
            "adapter, in the same order"
        )


def check_same_base(adapters: Sequence[LoraWeights], labels: Sequence[str]) -> str | None:
    """The shared base model name; different names or module shapes are an error."""
    named = {labels[i]: w.base_model for i, w in enumerate(adapters) if w.base_model}
    if len(set(named.values())) > 1:
        listing = "; ".join(f"{label}: {base}" for label, base in named.items())
        raise RankwiseError(f"the adapters were trained for different base models ({listing})")
    shapes: dict[str, tuple[list[int], str]] = {}
    for label, weights in zip(labels, adapters, strict=True):
        for module, (a, b) in weights.factors.items():
            shape = [b.shape[0], a.shape[1]]
            seen, first = shapes.setdefault(module, (shape, label))
            if shape != seen:
                raise RankwiseError(
                    f"{label} adapts {module} as a weight of shape {shape} (out, in) but {first} "
                    f"as {seen}: the adapters were trained for different base models"
                )
    return next(iter(named.values()), None)


def contributions(
    adapters: Sequence[LoraWeights], coefs: Sequence[float], grams: Sequence[Grams] | None = None
) -> dict[str, list[Contribution]]:
    """Each module's contributions (weight times scaling folded in), in first-seen module order."""
    wide = any(a.dtype == torch.float64 for a, _ in all_factors(adapters))
    dtype = torch.float64 if wide else torch.float32  # the SVDs and k-means run in full precision
    parts: dict[str, list[Contribution]] = {}
    for i, (weights, coef) in enumerate(zip(adapters, coefs, strict=True)):
        for module, (a, b) in weights.factors.items():
            gram = None
            if grams is not None:
                if module not in grams[i]:
                    raise RankwiseError(f"adapter {i} has no calibration statistics for {module}")
                gram = grams[i][module].to(device=a.device, dtype=dtype)  # (in, in)
            part = Contribution(a.to(dtype), b.to(dtype), coef * weights.scaling(module), gram)
            parts.setdefault(module, []).append(part)
    return parts


def all_factors(adapters: Sequence[LoraWeights]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (A, B) pair of every adapter."""
    return [pair for weights in adapters for pair in weights.factors.values()]


def common_dtype(adapters: Sequence[LoraWeights]) -> torch.dtype:
    """The inputs' dtype if they share one, else float32."""
    dtypes = {a.dtype for a, _ in all_factors(adapters)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def check_rank(
    rank: int | None,
    adapters: Sequence[LoraWeights],
    capacity: dict[str, int],
    merger: MergeMethod,
    method: str,
) -> int:
    """The requested rank (default: the largest input rank), if some module can reach it."""
    if rank is None:
        return max(w.rank(m) for w in adapters for m in w.factors)
    if rank < 1:
        raise RankwiseError(f"rank must be a positive integer, got {rank}")
    most = max(capacity.values())
    if rank > most:
        raise RankwiseError(
            f"rank {rank} is above what these adapters hold: {method} can give at most rank "
            f"{most} ({merger.capacity_note})"
        )
    return rank

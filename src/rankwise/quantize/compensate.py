"""A compressed base's low-rank compensation against its original, as a PEFT adapter.

Every linear layer the compressed model shares with the original (same name, same shape: an
NF-k or bitsandbytes base, a 2:4-pruned one, layers a compressor left dense) gets
B A ~ W_original - W_compressed from the chosen ``COMPENSATORS`` method; B is divided by the
adapter's scaling alpha / r, so the adapter's update s B A is the approximation itself.
Layers a compressor replaced (low-rank factors, A³'s attention) have no counterpart and are
skipped, and the run says how many.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from rankwise.adapters.inject import adaptable_modules
from rankwise.adapters.peft_format import LoraWeights
from rankwise.architectures import dense_weight, is_transposed, linear_shape, shared_input
from rankwise.compress.calibration import GRAM, collect_statistics
from rankwise.errors import RankwiseError
from rankwise.quantize.base import effective_weight
from rankwise.quantize.eora import COMPENSATORS


@dataclass
class Compensation:
    adapter: LoraWeights
    skipped: list[str]


def paired_layers(compressed: nn.Module, reference: nn.Module) -> tuple[list[str], list[str]]:
    """(names both models have with equal shapes, names of the compressed model's other layers)."""
    ours, theirs = adaptable_modules(compressed), adaptable_modules(reference)
    paired = [
        n for n, m in ours.items() if n in theirs and linear_shape(m) == linear_shape(theirs[n])
    ]
    if not paired:
        raise RankwiseError(
            "the compressed model shares no linear layer (same name and shape) with the "
            "reference: was it compressed from another model?"
        )
    return paired, [n for n in ours if n not in paired]


@torch.no_grad()
def compensate(
    compressed: nn.Module,
    reference: nn.Module,
    method: str,
    rank: int,
    alpha: float,
    input_ids: torch.Tensor | None = None,
    base_model: str | None = None,
) -> Compensation:
    """The compensation adapter of ``compressed`` against ``reference`` (inputs: ``input_ids``)."""
    if method not in COMPENSATORS:
        raise RankwiseError(f"unknown method '{method}': choose one of {', '.join(COMPENSATORS)}")
    compensator = COMPENSATORS[method]
    names, skipped = paired_layers(compressed, reference)
    reads = {n: shared_input(compressed.config, n) for n in names}  # k/v read q's input
    prepared = {}
    if compensator.prepare is not None:
        if input_ids is None:
            raise RankwiseError(f"{method} needs calibration data")
        needs = {source: {GRAM} for source in reads.values()}
        grams = collect_statistics(compressed, input_ids, needs).gram
        prepared = {source: compensator.prepare(gram) for source, gram in grams.items()}
    ours, theirs = adaptable_modules(compressed), adaptable_modules(reference)
    factors = {}
    for name in tqdm(names, desc=f"compensate {method}", unit="layer"):
        weight = effective_weight(ours[name])
        delta = dense_weight(theirs[name]).float().to(weight.device) - weight  # [out, in]
        a, b = compensator.factors(delta, prepared.get(reads[name]), min(rank, *delta.shape))
        factors[name] = (a.float(), b.float() * (a.shape[0] / alpha))
    transposed = any(is_transposed(ours[n]) for n in names)  # GPT-2's Conv1D (PEFT's flag)
    adapter = LoraWeights(
        factors, dict.fromkeys(factors, alpha), False, 0.0, base_model, transposed
    )
    return Compensation(adapter, skipped)

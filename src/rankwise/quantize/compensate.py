"""A compressed base's low-rank compensation against its original, as a PEFT adapter.

Every linear layer the compressed model shares with the original (same name and shape: an NF-k
or bitsandbytes base, a 2:4-pruned one, layers a compressor left dense) gets
B A ~ W_original - W_compressed from the chosen ``COMPENSATORS`` method; B is divided by the
adapter's scaling alpha / r, so the adapter's update s B A is the approximation itself.

Layers a structured compressor narrowed on the input side only (A³'s o_proj and down_proj read
fewer value or MLP channels, into the same output width) have no same-shape error. For them the
error is a regression (rankwise's extension of EoRA, which covers same-shape compression): with
x_c the layer's input in the compressed model and x the original layer's input when the
original block runs on the same hidden state (``cross_moments``),
    dW = W X C⁻¹ - W_c,  X = E[x x_cᵀ], C = E[x_c x_cᵀ],
the least-squares prediction of the removed channels' contribution from the kept ones (plus the
kept columns' own change). E||W x - (W_c + B A) x_c||² is then a constant plus EoRA's
activation-weighted error of dW - B A under C, so EoRA's factors follow unchanged; for a
same-shape layer with x = x_c the formula is W - W_c again. C is inverted with a ridge
λ = 1e-3 · mean diag C (``DAMPING``): calibration barely reaches some directions, and an
undamped fit puts large weights there (on SmolLM2, A³ 30%, r16: ridge 1e-3 → perplexity 25.03,
1e-2 → 25.24, 1e-1 → 26.51). Only methods that read calibration data (``eora``) regress; layers
whose output width changed (A³'s q/k/v, gate/up) have no common output to match and are skipped,
counted in the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from rankwise.adapters.inject import adaptable_modules
from rankwise.adapters.peft_format import LoraWeights
from rankwise.architectures import dense_weight, is_transposed, linear_shape, shared_input
from rankwise.compress.base import damped
from rankwise.compress.calibration import GRAM, collect_statistics, cross_moments
from rankwise.errors import RankwiseError
from rankwise.quantize.base import effective_weight
from rankwise.quantize.eora import COMPENSATORS

DAMPING = 1e-3  # the regression's ridge, relative to the mean input energy


@dataclass
class Compensation:
    adapter: LoraWeights
    skipped: list[str]


@dataclass(frozen=True)
class Pairing:
    """The compressed model's layers by their counterpart in the reference."""

    same: list[str]  # same name, same shape
    narrowed: list[str]  # same name and output width, fewer inputs
    skipped: list[str]  # no counterpart whose output they could match


def pair_layers(compressed: nn.Module, reference: nn.Module) -> Pairing:
    """Sort the compressed model's linear layers by how they match the reference's."""
    ours, theirs = adaptable_modules(compressed), adaptable_modules(reference)
    same, narrowed, skipped = [], [], []
    for name, module in ours.items():
        shape, original = linear_shape(module), theirs.get(name)
        if original is not None and linear_shape(original) == shape:
            same.append(name)
        elif original is not None and linear_shape(original)[1] == shape[1]:
            narrowed.append(name)
        else:
            skipped.append(name)
    if not same and not narrowed:
        raise RankwiseError(
            "the compressed model shares no linear layer (same name and output width) with the "
            "reference: was it compressed from another model?"
        )
    return Pairing(same, narrowed, skipped)


def regressed_error(
    original: torch.Tensor,
    compressed: torch.Tensor,
    cross: torch.Tensor,
    gram: torch.Tensor,
    damping: float = DAMPING,
) -> torch.Tensor:
    """W X (C + λI)⁻¹ - W_c [out, in_c] for a narrowed layer (λ = ``damping`` · mean diag C)."""
    ridge = damped(gram.double(), damping)
    solved = torch.linalg.solve(ridge, cross.double().T).T  # X (C + λI)⁻¹, C symmetric
    return (original.double() @ solved - compressed.double()).float()


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
    pairing = pair_layers(compressed, reference)
    narrowed = pairing.narrowed if compensator.prepare is not None else []
    skipped = pairing.skipped + [n for n in pairing.narrowed if n not in narrowed]
    reads = {n: shared_input(compressed.config, n) for n in pairing.same}  # k/v read q's input
    prepared, moments = {}, {}
    if compensator.prepare is not None:
        if input_ids is None:
            raise RankwiseError(f"{method} needs calibration data")
        needs = {source: {GRAM} for source in reads.values()}
        grams = collect_statistics(compressed, input_ids, needs).gram if needs else {}
        prepared = {source: compensator.prepare(gram) for source, gram in grams.items()}
        if narrowed:
            moments = cross_moments(compressed, reference, input_ids, narrowed)
            for name, (gram, _) in moments.items():
                prepared[name], reads[name] = compensator.prepare(gram), name
    ours, theirs = adaptable_modules(compressed), adaptable_modules(reference)
    factors = {}
    for name in tqdm(pairing.same + narrowed, desc=f"compensate {method}", unit="layer"):
        weight = effective_weight(ours[name])
        original = dense_weight(theirs[name]).float().to(weight.device)
        if name in moments:
            gram, cross = moments[name]
            delta = regressed_error(original, weight, cross.to(weight.device), gram)
        else:
            delta = original - weight  # [out, in]
        a, b = compensator.factors(delta, prepared.get(reads[name]), min(rank, *delta.shape))
        factors[name] = (a.float(), b.float() * (a.shape[0] / alpha))
    transposed = any(is_transposed(ours[n]) for n in factors)  # GPT-2's Conv1D (PEFT's flag)
    adapter = LoraWeights(
        factors, dict.fromkeys(factors, alpha), False, 0.0, base_model, transposed
    )
    return Compensation(adapter, skipped)

"""Each task's input statistics for the merges that read data (RegMean): its prompts, unlabeled.

For adapter t, the first ``samples`` records of its calibration source are encoded as training
would encode them and cut down to their prompts (every token the loss would skip; a plain-text
record counts whole): answers are never read. The prompts are joined into one stream, cut into
rows of ``seq_len`` tokens, and run through the base model with adapter t attached, collecting
E[x xᵀ] of every module's inputs through the compression pillar's statistics code
(``compress.calibration.collect_statistics``). Choice: rows cross prompt boundaries (no padding
enters the statistics); a stream shorter than one row is one row.

RegMean++ (``merge_layer_by_layer``) measures block ℓ's inputs on the model whose earlier blocks
already carry the merged update and whose block ℓ carries task t's own adapter, merging one
decoder block at a time (blocks are numbered by the first ``.N.`` in a module name; modules
outside any block come last). It costs one calibration pass per task and block.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Sequence

import torch

from rankwise.adapters import LoraWeights, attach_adapters, remove_experts
from rankwise.compress.calibration import GRAM, collect_statistics
from rankwise.data import IGNORE_INDEX
from rankwise.data.formatting import encode_example
from rankwise.data.sources import load_dataset_spec
from rankwise.errors import RankwiseError
from rankwise.merge.api import MergeReport, MergeResult
from rankwise.models import LoadedModel

BLOCK = re.compile(r"\.(\d+)\.")
Merge = Callable[[list[LoraWeights], list[dict[str, torch.Tensor]]], MergeResult]


def prompt_rows(tokenizer, data: str, samples: int, seq_len: int) -> torch.Tensor:
    """The prompts of the first ``samples`` records of ``data`` as rows (rows, seq_len), host."""
    records = load_dataset_spec(data, split="train").records[:samples]
    if not records:
        raise RankwiseError(f"calibration source '{data}' holds no records")
    stream: list[int] = []
    for record in records:
        encoded = encode_example(record, tokenizer, max_length=sys.maxsize)
        pairs = zip(encoded["input_ids"], encoded["labels"], strict=True)
        prompt = [i for i, label in pairs if label == IGNORE_INDEX]
        stream += prompt or encoded["input_ids"]
    width = min(seq_len, len(stream))
    rows = len(stream) // width
    return torch.tensor(stream[: rows * width], device="cpu").view(rows, width)


def task_grams(
    loaded: LoadedModel,
    adapters: Sequence[LoraWeights],
    sources: Sequence[str],
    *,
    samples: int = 64,
    seq_len: int = 256,
) -> list[dict[str, torch.Tensor]]:
    """Per adapter, E[x xᵀ] of each module it adapts, on its own source with it attached."""
    if len(sources) != len(adapters):
        raise RankwiseError(
            f"got {len(sources)} calibration sources for {len(adapters)} adapters: give one per "
            "adapter, in the same order"
        )
    grams = []
    for weights, source in zip(adapters, sources, strict=True):
        rows = prompt_rows(loaded.tokenizer, source, samples, seq_len)
        grams.append(input_grams(loaded, weights, weights.factors, rows))
    return grams


def input_grams(
    loaded: LoadedModel, attached: LoraWeights, modules: Iterable[str], rows: torch.Tensor
) -> dict[str, torch.Tensor]:
    """E[x x^T] of each module's input over ``rows``, with ``attached`` on the model."""
    attach_adapters(loaded.model, [attached])
    try:
        return collect_statistics(loaded.model, rows, {m: {GRAM} for m in modules}).gram
    finally:
        remove_experts(loaded.model)


def block_of(module: str) -> float:
    """The decoder block a module belongs to (its first ``.N.``), or infinity."""
    found = BLOCK.search(module)
    return int(found[1]) if found else float("inf")


def restricted(weights: LoraWeights, modules: Sequence[str]) -> LoraWeights:
    """``weights`` on ``modules`` only, each module's scaling folded into B (alpha = rank)."""
    factors = {
        m: (a, weights.scaling(m) * b) for m, (a, b) in weights.factors.items() if m in modules
    }
    alphas = {m: float(a.shape[0]) for m, (a, _) in factors.items()}
    return LoraWeights(
        factors,
        alphas,
        dropout=weights.dropout,
        base_model=weights.base_model,
        fan_in_fan_out=weights.fan_in_fan_out,
    )


def merge_layer_by_layer(
    loaded: LoadedModel,
    adapters: Sequence[LoraWeights],
    sources: Sequence[str],
    merge: Merge,
    *,
    samples: int = 64,
    seq_len: int = 256,
) -> MergeResult:
    """RegMean++: merge block by block, each block's inputs through the merged earlier blocks."""
    modules = list(dict.fromkeys(m for w in adapters for m in w.factors))
    blocks = sorted({block_of(m) for m in modules})
    rows = [prompt_rows(loaded.tokenizer, s, samples, seq_len) for s in sources]
    done = LoraWeights({}, {})
    ranks: dict[str, int] = {}
    energy: dict[str, tuple[float, float]] = {}
    for block in blocks:
        here = [m for m in modules if block_of(m) == block]
        grams, parts = [], []
        for weights, task_rows in zip(adapters, rows, strict=True):
            own = restricted(weights, here)
            parts.append(own)
            if not own.factors:  # this adapter leaves the block alone
                grams.append({})
                continue
            probe = LoraWeights({**done.factors, **own.factors}, {**done.alphas, **own.alphas})
            grams.append(input_grams(loaded, probe, own.factors, task_rows))
        result = merge(parts, grams)
        done.factors.update(result.weights.factors)
        done.alphas.update(result.weights.alphas)
        ranks |= result.report.ranks
        energy |= result.report.energy
        method = result.report.method
    merged = result.weights
    merged.factors, merged.alphas = done.factors, done.alphas
    return MergeResult(merged, MergeReport(method, ranks, energy))

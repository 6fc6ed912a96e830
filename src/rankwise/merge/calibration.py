"""Each task's input statistics for the merges that read data (RegMean): its prompts, unlabeled.

For adapter t, the first ``samples`` records of its calibration source are encoded as training
would encode them and cut down to their prompts (every token the loss would skip; a plain-text
record counts whole): answers are never read. The prompts are joined into one stream, cut into
rows of ``seq_len`` tokens, and run through the base model with adapter t attached, collecting
E[x xᵀ] of every module's inputs through the compression pillar's statistics code
(``compress.calibration.collect_statistics``). Choice: rows cross prompt boundaries (no padding
enters the statistics); a stream shorter than one row is one row.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from rankwise.adapters import LoraWeights, attach_adapters, remove_experts
from rankwise.compress.calibration import GRAM, collect_statistics
from rankwise.data import IGNORE_INDEX
from rankwise.data.formatting import encode_example
from rankwise.data.sources import load_dataset_spec
from rankwise.errors import RankwiseError
from rankwise.models import LoadedModel


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
        attach_adapters(loaded.model, [weights])
        try:
            needs = {module: {GRAM} for module in weights.factors}
            grams.append(collect_statistics(loaded.model, rows, needs).gram)
        finally:
            remove_experts(loaded.model)
    return grams

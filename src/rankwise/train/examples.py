"""The examples a run trains on: tokenised records, their label counts, each step's batch."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from rankwise.data import (
    IGNORE_INDEX,
    encode_example,
    eos_id,
    load_dataset_spec,
    pack_tokens,
    tokenize_texts,
)
from rankwise.errors import RankwiseError
from rankwise.train.config import RunConfig
from rankwise.train.distributed import World, shard_map

Example = dict[str, list[int]]


def build_examples(
    spec: str, tokenizer: PreTrainedTokenizerBase, config: RunConfig, split: str, world: World
) -> tuple[list[Example], int]:
    """Tokenised examples for a data spec, and how many malformed lines were skipped.

    Plain text records are packed into ``seq_len`` blocks; prompt/completion and chat records
    become one example each, with labels only on what the model should write. Each process
    tokenises every ``world.size``-th record and the results are exchanged.
    """
    n = config.train_examples if split == "train" else config.eval_examples
    records = load_dataset_spec(spec, split=split, n=n, skip_bad_lines=config.skip_bad_lines)
    texts = [r["text"] for r in records.records if "text" in r]
    prompted = [r for r in records.records if "text" not in r]
    pieces = shard_map(lambda text: tokenize_texts([text], tokenizer)[0], texts, world)
    encoded = shard_map(lambda r: encode_example(r, tokenizer, config.seq_len), prompted, world)
    examples = (
        [
            {"input_ids": block, "labels": list(block)}
            for block in pack_tokens(pieces, eos_id(tokenizer), config.seq_len)
        ]
        if texts
        else []
    )
    examples += [e for e in encoded if any(label != IGNORE_INDEX for label in e["labels"][1:])]
    if not examples:
        raise RankwiseError(
            f"'{spec}' gave no trainable examples (texts shorter than seq_len={config.seq_len}?)"
        )
    return examples, records.skipped


def validation_spec(config: RunConfig) -> str | None:
    """The data to validate on: eval_data, else the validation split of a built-in source."""
    if config.eval_data:
        return config.eval_data
    return config.data if config.data.split(":")[0] in ("task", "corpus") else None


def label_tokens(batch: list[Example]) -> int:
    """Tokens the loss is taken over (labels shifted by one, as the model predicts the next)."""
    return sum(sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in batch)


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: consecutive slices of per-epoch permutations."""
    indices: list[int] = []
    position = step * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(global_batch - len(indices), n - offset)
        indices += order[offset : offset + take].tolist()
        position += take
    return indices

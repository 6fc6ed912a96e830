"""Exact-match accuracy of batched greedy answers on prompt/completion records, per task."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rankwise.evaluate.generation import generate_batch


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> dict[str, dict]:
    """Per task (records' "task" key, else "all"): accuracy, counts and every prediction.

    A prediction matches when it equals the completion after stripping whitespace.
    """
    answers = generate_batch(
        model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size
    )
    tallies: dict[str, dict] = defaultdict(lambda: {"correct": 0, "total": 0, "predictions": []})
    for record, answer in zip(records, answers, strict=True):
        tally = tallies[record.get("task", "all")]
        correct = answer.strip() == record["completion"].strip()
        tally["total"] += 1
        tally["correct"] += correct
        tally["predictions"].append(
            {
                "prompt": record["prompt"],
                "expected": record["completion"],
                "answer": answer.strip(),
                "correct": correct,
            }
        )
    for tally in tallies.values():
        tally["accuracy"] = tally["correct"] / tally["total"]
    return dict(tallies)

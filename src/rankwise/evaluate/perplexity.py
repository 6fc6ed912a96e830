"""Perplexity with a sliding window: each token is scored once, with up to ``window`` of context.

Texts are tokenised (with the tokenizer's own special tokens) and joined by EOS into one stream.
Windows of ``window`` tokens start every ``stride`` tokens; a window scores only the tokens the
previous one did not (Hugging Face's strided recipe), so with ``stride < window`` every scored
token after the first window sees at least ``window - stride`` tokens of context. The first
token of the stream is never scored, as in the plain causal-LM loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from rankwise.errors import RankwiseError


def token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids of ``texts``, each encoded as the tokenizer does by default, EOS between."""
    stream: list[int] = []
    for index, ids in enumerate(tokenizer(list(texts))["input_ids"]):
        if index:
            stream.append(tokenizer.eos_token_id)
        stream += ids
    return stream


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window over ``length`` tokens: the last ``scored`` are new."""
    spans, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        spans.append((begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return spans


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    window: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    max_tokens: int | None = None,
) -> float:
    """exp(mean negative log-likelihood) of ``texts`` under ``model``, in sliding windows.

    ``max_tokens`` keeps only the first that many tokens of the stream (to bound the cost).
    """
    if tokenizer.eos_token_id is None:
        raise RankwiseError("perplexity needs a tokenizer with an end-of-sequence token")
    if not 0 < stride <= window:
        raise RankwiseError(f"stride must be in [1, window={window}], got {stride}")
    stream = token_stream(texts, tokenizer)[:max_tokens]
    if len(stream) < 2:
        raise RankwiseError("perplexity needs texts of at least two tokens")
    ids = torch.tensor(stream)
    device = next(model.parameters()).device
    spans = windows(len(stream), window, stride)
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync
    count = 0
    for start in range(0, len(spans), batch_size):
        batch = spans[start : start + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.eos_token_id)  # (B, T)
        labels = torch.full((len(batch), width), -100)  # (B, T): -100 is not scored
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, (begin, end, scored) in enumerate(batch):
            n = end - begin
            input_ids[row, :n] = ids[begin:end]
            labels[row, n - scored : n] = ids[end - scored : end]
            mask[row, :n] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        count += int((labels[:, 1:] != -100).sum())  # counted on the CPU copy
        targets = labels[:, 1:].to(device)  # (B, T-1)
        total += F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").double()
    return float((total / count).exp())

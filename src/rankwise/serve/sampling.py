"""Choosing each sequence's next token: greedy, or nucleus sampling with its own generator.

A sampled request owns a ``torch.Generator`` on the model's device, seeded from its ``seed``,
so seeded sampling is reproducible and does not depend on what else runs in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rankwise.serve.requests import GenerationRequest


def generator_for(request: GenerationRequest, device: torch.device) -> torch.Generator | None:
    """The request's own generator on ``device`` (None when greedy), seeded if it asks."""
    if request.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if request.seed is not None:
        generator.manual_seed(request.seed)
    else:
        generator.seed()
    return generator


def sample(
    logits: torch.Tensor,
    requests: Sequence[GenerationRequest],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Next token of each row of ``logits`` [rows, vocab]: greedy at temperature 0, else top-p."""
    tokens = logits.argmax(-1).tolist()
    for i, (request, generator) in enumerate(zip(requests, generators, strict=True)):
        if generator is not None:
            probs = torch.softmax(logits[i].float() / request.temperature, -1)
            if request.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs > request.top_p
                probs[order[outside]] = 0
            tokens[i] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a sequence: the generation config's and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found

"""Text generation: one prompt streamed to the terminal, or many prompts greedily in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from rankwise.data.formatting import encode_prompt


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy when temperature is 0, else nucleus sampling with a seed."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    sampling: Sampling = Sampling(),
    stream: bool = False,
) -> str:
    """Complete one prompt (chat template applied for instruct models); optionally stream it."""
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    inputs = left_padded([encode_prompt(prompt, tokenizer)], tokenizer.pad_token_id, model.device)
    streamer = (
        TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    )
    output = model.generate(
        **inputs,
        **sampling.generate_kwargs(),
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions for many prompts, left-padded in batches (for exact-match scoring)."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(p, tokenizer) for p in prompts[start : start + batch_size]]
        inputs = left_padded(ids, tokenizer.pad_token_id, model.device)
        output = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += tokenizer.batch_decode(
            output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return answers


def left_padded(
    ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask with every row padded on the left to the longest one.

    Built on the CPU row by row, then moved to ``device`` in one copy each.
    """
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

"""Turn records into token ids and loss labels: chat templates, completion-only masks, packing.

Labels follow the transformers convention: ``IGNORE_INDEX`` (-100) marks a token the loss skips.

How a conversation is tokenised: it is rendered prefix by prefix with the chat template (the
turns before each assistant message with ``add_generation_prompt=True``, then with that message
added). Each rendering must extend the previous one as text; a template that rewrites earlier
turns raises an error. Each new piece of text is tokenised on its own and the pieces are joined,
so token boundaries always fall on turn boundaries and the prompt part is exactly
``encode_prompt(prompt)``, the ids evaluation generates from. For the embedded SmolLM2
tokenizer the joined ids equal those of the whole rendered conversation (tested); for a
tokenizer where they differ, training still sees what generation sees.

An assistant piece is learned up to and including its end-of-sequence token (``<|im_end|>`` in
ChatML); template text after it (ChatML's newline) is not, since generation stops at that token.
"""

from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from rankwise.errors import RankwiseError

IGNORE_INDEX = -100


def format_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a model answers `prompt` from: a chat user turn plus assistant header, or as is."""
    if not tokenizer.chat_template:
        return prompt
    return _render([{"role": "user", "content": prompt}], tokenizer, add_generation_prompt=True)


def encode_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of `format_prompt(prompt)`: what generation starts from and training masks."""
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (BOS).
    text = format_prompt(prompt, tokenizer)
    return _tokenize(text, tokenizer, add_special_tokens=not tokenizer.chat_template)


def encode_example(
    record: dict, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[int]]:
    """Input ids and labels for one validated record, labels only on what the model should write."""
    if "messages" in record:
        input_ids, labels = _encode_messages(record["messages"], tokenizer)
    elif "prompt" in record and tokenizer.chat_template:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        input_ids, labels = _encode_messages(messages, tokenizer)
    elif "prompt" in record:
        prompt_ids = encode_prompt(record["prompt"], tokenizer)
        answer_ids = _tokenize(record["completion"], tokenizer) + [eos_id(tokenizer)]
        input_ids = prompt_ids + answer_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    else:
        input_ids = _tokenize(record["text"], tokenizer, add_special_tokens=True)
        input_ids.append(eos_id(tokenizer))
        labels = list(input_ids)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def pack_texts(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> list[list[int]]:
    """Tokenise, join with EOS, cut into full blocks (tail dropped); a block is its own labels."""
    return pack_tokens(tokenize_texts(texts, tokenizer), eos_id(tokenizer), block_size)


def tokenize_texts(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each text's token ids, without special tokens (what ``pack_tokens`` joins)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def pack_tokens(pieces: Iterable[list[int]], eos: int, block_size: int) -> list[list[int]]:
    """Join token lists with ``eos`` after each and cut the stream into full blocks."""
    stream: list[int] = []
    for ids in pieces:
        stream.extend(ids)
        stream.append(eos)
    if len(stream) < block_size:
        raise RankwiseError(
            f"The texts hold {len(stream)} tokens, fewer than one block of {block_size}."
        )
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids, labels (padded with -100) and attention_mask tensors.

    Built on the CPU (row by row from Python lists); callers move the batch to the model's
    device in one copy per tensor.
    """
    width = max(len(example["input_ids"]) for example in batch)
    host = {"dtype": torch.long, "device": "cpu"}
    input_ids = torch.full((len(batch), width), pad_id, **host)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, **host)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), **host)  # (B, T)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], **host)
        labels[row, :n] = torch.tensor(example["labels"], **host)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _encode_messages(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    if not tokenizer.chat_template:
        raise RankwiseError("Records with 'messages' need a tokenizer with a chat template.")
    eos = tokenizer.eos_token_id
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text tokenised so far
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(messages[:index], tokenizer, add_generation_prompt=True)
        after = _render(messages[: index + 1], tokenizer, add_generation_prompt=False)
        context = _tokenize(_extension(done, before), tokenizer)
        answer = _tokenize(_extension(before, after), tokenizer)
        # Learn the answer through its last EOS; what the template writes after it is context.
        learned = len(answer) - answer[::-1].index(eos) if eos in answer else len(answer)
        input_ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer[:learned]
        labels += [IGNORE_INDEX] * (len(answer) - learned)
        done = after
    rest = _tokenize(_extension(done, _render(messages, tokenizer)), tokenizer)
    return input_ids + rest, labels + [IGNORE_INDEX] * len(rest)


def _render(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool = False
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _extension(prefix: str, text: str) -> str:
    """The part of `text` after `prefix`; an error if the chat template broke the prefix."""
    if not text.startswith(prefix):
        raise RankwiseError(
            "The tokenizer's chat template renders a conversation differently from its prefix, "
            "so assistant turns cannot be located for the loss mask."
        )
    return text[len(prefix) :]


def _tokenize(
    text: str, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool = False
) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise RankwiseError("The tokenizer has no end-of-sequence token to end examples with.")
    return tokenizer.eos_token_id

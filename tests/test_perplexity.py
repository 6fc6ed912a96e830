"""Sliding-window perplexity: equal to the plain loss without striding, each token scored once."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from test_compress_storage import tiny_tokenizer

from rankwise.errors import RankwiseError
from rankwise.evaluate.perplexity import perplexity, token_stream, windows

TEXT = " ".join(f"t{(7 * i) % 128}" for i in range(40))


def test_equals_the_plain_loss_without_striding():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert perplexity(model, tokenizer, [TEXT], window=64, stride=64) == pytest.approx(expected)


@pytest.mark.parametrize(("length", "window", "stride"), [(100, 32, 16), (100, 32, 32), (7, 32, 8)])
def test_windows_score_every_token_once(length, window, stride):
    scored = []
    for begin, end, count in windows(length, window, stride):
        assert end - begin <= window and count <= end - begin
        scored += range(end - count, end)
    assert scored == list(range(length))  # (token 0 has no prediction; the label shift drops it)


def test_striding_gives_later_tokens_context_and_batching_does_not_matter():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    texts = [TEXT, TEXT[:50], TEXT]
    one = perplexity(model, tokenizer, texts, window=16, stride=8, batch_size=1)
    many = perplexity(model, tokenizer, texts, window=16, stride=8, batch_size=3)
    assert one == pytest.approx(many, rel=1e-5)
    chunks = perplexity(model, tokenizer, texts, window=16, stride=16)
    assert one != pytest.approx(chunks)


def test_texts_are_joined_by_eos_and_can_be_capped():
    tokenizer = tiny_tokenizer()
    stream = token_stream(["t5 t6", "t7"], tokenizer)
    assert stream == [5, 6, tokenizer.eos_token_id, 7]
    model = tiny_llama()
    capped = perplexity(model, tokenizer, [TEXT], window=32, stride=32, max_tokens=8)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:8]])
    assert capped == pytest.approx(math.exp(model(input_ids=ids, labels=ids).loss.item()))


def test_bad_settings_are_errors():
    with pytest.raises(RankwiseError, match="stride"):
        perplexity(tiny_llama(), tiny_tokenizer(), [TEXT], window=8, stride=9)
    with pytest.raises(RankwiseError, match="two tokens"):
        perplexity(tiny_llama(), tiny_tokenizer(), ["t3"])

"""Incremental detokenization with stop strings, for streaming one sequence's text."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"  # what a byte-level tokenizer shows for a cut UTF-8 character


class TextStream:
    """Turns generated token ids into text deltas, holding back what could start a stop string.

    Decodes a short window of ids (``prefix``..end) and emits the part past ``read``, as vLLM
    does, so each token costs O(1) and tokenizers that drop a leading space when decoding from
    the middle of a word still produce the right text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is context already turned into text
        self.text = ""
        self.sent = 0  # characters of ``text`` handed out

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        """Append one generated token; its text joins ``text`` once it is complete."""
        self.ids.append(token)
        self.catch_up(final=False)

    def catch_up(self, final: bool) -> None:
        """Move decoded text of ids past ``read`` into ``text`` (all of it when ``final``)."""
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith(INCOMPLETE)):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def take(self, final: bool = False) -> tuple[str, bool]:
        """(text not yet handed out, whether a stop string ended it); ``final`` flushes all."""
        if final:
            self.catch_up(final=True)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = (len(self.text) if final else len(self.text) - self.hold), False
        if end <= self.sent:
            return "", stopped
        delta, self.sent = self.text[self.sent : end], end
        return delta, stopped

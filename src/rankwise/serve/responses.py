"""OpenAI's response shapes for completions and chat, whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from rankwise.serve.http_errors import error_body
from rankwise.serve.requests import Chunk, Event, Failure, Ticket


class Shape:
    """How one endpoint's responses look: stream chunks and the whole response."""

    prefix: str
    kind: str

    def head(self, model: str) -> dict:
        return {
            "id": f"{self.prefix}-{uuid.uuid4().hex}",
            "object": self.kind,
            "created": int(time.time()),
            "model": model,
        }

    def choice(self, text: str | None, finish: str | None, first: bool) -> dict:
        raise NotImplementedError

    def whole(self, head: dict, text: str, last: Chunk) -> dict:
        raise NotImplementedError


class CompletionShape(Shape):
    prefix, kind = "cmpl", "text_completion"

    def choice(self, text: str | None, finish: str | None, first: bool) -> dict:
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    def whole(self, head: dict, text: str, last: Chunk) -> dict:
        return {
            **head,
            "choices": [self.choice(text, last.finish_reason, True)],
            "usage": usage(last),
        }


class ChatShape(Shape):
    prefix, kind = "chatcmpl", "chat.completion.chunk"

    def choice(self, text: str | None, finish: str | None, first: bool) -> dict:
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def whole(self, head: dict, text: str, last: Chunk) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": last.finish_reason,
            "logprobs": None,
        }
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(last)}


completion_shape, chat_shape = CompletionShape(), ChatShape()


def failure_body(failure: Failure) -> dict:
    """The error object for a request the engine could not finish (HTTP 503)."""
    return error_body(failure.message, "server_error", failure.code)


async def sse(
    ticket: Ticket, events: asyncio.Queue[Event], head: dict, shape: Shape, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, the finish reason, usage, then [DONE].

    A failure (the engine failed, or shut down first) is sent as an error event before [DONE].
    """
    try:
        if shape is chat_shape:
            yield data({**head, "choices": [shape.choice("", None, True)]})
        while True:
            event = await events.get()
            if isinstance(event, Failure):
                yield data({"error": failure_body(event)})
                break
            if event.text:
                yield data({**head, "choices": [shape.choice(event.text, None, False)]})
            if event.finish_reason is not None:
                yield data({**head, "choices": [shape.choice(None, event.finish_reason, False)]})
                if include_usage:
                    yield data({**head, "choices": [], "usage": usage(event)})
                break
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()


def data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def usage(chunk: Chunk) -> dict:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }

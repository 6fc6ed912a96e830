"""Request bodies of the OpenAI-compatible endpoints, read and validated strictly (wrong types
are 400, bodies over ``MAX_BODY`` bytes 413).

Fields rankwise does not implement are accepted only at their neutral value (``n=1``,
``echo=false``, no logprobs, no penalties, no tools), so a request never silently means
something else; unknown extra fields are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from rankwise.serve.http_errors import ApiError

MAX_BODY = 1 << 20  # bytes of JSON a request may send
Stop = str | Annotated[list[str], Field(max_length=4)] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(Sampling):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | list[int]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatBody(Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    tools: None = None


class AddAdapter(BaseModel):
    """POST /admin/adapters: serve the folder DIR/<name>."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, schema: type[Body]) -> Body:
    """The JSON body (at most MAX_BODY bytes) validated against ``schema``; errors are 400."""
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from err
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(
            400, f"{param}: {first['msg']}" if param else first["msg"], param=param
        ) from err

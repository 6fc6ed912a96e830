"""The OpenAI-compatible HTTP API over an ``Engine``: a Starlette app that uvicorn runs.

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (streamed as server-sent events
or not) pick the adapter by the ``model`` field: the base model's name means no adapter.
``/admin/adapters`` lists, adds (a folder already in the adapter directory) and removes
adapters. Every error is OpenAI-shaped JSON ``{"error": {"message", "type", "param", "code"}}``.
With an API key every endpoint needs ``Authorization: Bearer KEY``; admin endpoints always do.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rankwise.errors import RankwiseError
from rankwise.serve.engine import Engine
from rankwise.serve.folder import AdapterFolder
from rankwise.serve.requests import (
    Chunk,
    Event,
    Failure,
    GenerationRequest,
    Overloaded,
    ShuttingDown,
    Ticket,
    UnknownModel,
)
from rankwise.serve.schemas import AddAdapter, ChatBody, CompletionBody, Sampling

log = logging.getLogger("rankwise.serve")
MAX_BODY = 1 << 20  # bytes of JSON a request may send
Body = TypeVar("Body", bound=BaseModel)
DISCONNECT_POLL = 1.0  # seconds between checks that a non-streaming client is still there


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status,
            message,
            kind,
            code,
            param,
        )

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class Auth:
    """ASGI middleware: the API key guards every endpoint; admin endpoints need one to exist."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> ApiError | None:
        if self.key is None:
            if scope["path"].startswith("/admin"):
                return ApiError(
                    403,
                    "admin endpoints need the server started with --api-key",
                    "permission_error",
                    "admin_disabled",
                )
            return None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.key.encode()
        ):
            return ApiError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY)",
                "authentication_error",
                "invalid_api_key",
            )
        return None


class Api:
    """Routes and their handlers over one engine and its adapter folder."""

    def __init__(self, engine: Engine, folder: AdapterFolder, base_name: str):
        self.engine, self.folder, self.base_name = engine, folder, base_name
        self.started = int(time.time())

    def app(
        self,
        api_key: str | None = None,
        on_start: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> ASGIApp:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            if on_start:
                on_start()
            yield
            if on_stop:
                on_stop()

        routes = [
            Route("/health", self.health),
            Route("/v1/models", self.models),
            Route("/v1/models/{name}", self.model),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/admin/adapters", self.list_adapters),
            Route("/admin/adapters", self.add_adapter, methods=["POST"]),
            Route("/admin/adapters/{name}", self.delete_adapter, methods=["DELETE"]),
        ]
        handlers = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash}
        app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
        return Auth(app, api_key)

    # Models -------------------------------------------------------------------------------

    def model_cards(self) -> list[dict]:
        base = {
            "id": self.base_name,
            "object": "model",
            "created": self.started,
            "owned_by": "rankwise",
            "root": self.base_name,
            "parent": None,
        }
        cards = [base]
        for name, adapter in sorted(self.engine.adapters.items()):
            cards.append({**base, "id": name, "created": adapter.created, "parent": self.base_name})
        return cards

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self.model_cards()})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        for card in self.model_cards():
            if card["id"] == name:
                return JSONResponse(card)
        raise unknown_model(name)

    # Generation ---------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = await read_body(request, CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of one prompt
        ids = await self.encode(prompt, special=True) if isinstance(prompt, str) else prompt
        return await self.generate(request, body, ids, body.max_tokens or 16, completion_shape)

    async def chat(self, request: Request) -> Response:
        body = await read_body(request, ChatBody)
        tokenizer = self.engine.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(
                400, f"the model '{self.base_name}' has no chat template; use /v1/completions"
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = await self.encode(text, special=False)
        room = min(self.engine.config.max_new_tokens, self.engine.context - len(ids))
        max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
        return await self.generate(request, body, ids, max_tokens, chat_shape)

    async def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text``, tokenized off the event loop (a prompt may be long)."""
        tokenizer = self.engine.tokenizer
        encoded = await asyncio.to_thread(tokenizer, text, add_special_tokens=special)
        return encoded["input_ids"]

    async def generate(
        self, http: Request, body: Sampling, ids: list[int], max_tokens: int, shape: Shape
    ) -> Response:
        request = GenerationRequest(
            ids,
            adapter=None if body.model == self.base_name else body.model,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        ticket = self.submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        head = shape.head(body.model)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = sse(ticket, events, head, shape, include_usage)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        text: list[str] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                except TimeoutError:
                    if await http.is_disconnected():  # nobody to answer: stop generating
                        return Response(status_code=499)
                    continue
                if isinstance(event, Failure):
                    raise ApiError(503, event.message, "server_error", "generation_failed")
                text.append(event.text)
                if event.finish_reason is not None:
                    return JSONResponse(shape.whole(head, "".join(text), event))
        finally:
            ticket.cancel()  # a no-op once finished; stops the work if the client went away

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Ticket:
        try:
            return self.engine.submit(request, sink)
        except UnknownModel as err:
            raise unknown_model(request.adapter or "") from err
        except Overloaded as err:
            raise ApiError(429, str(err), "rate_limit_error", "rate_limit_exceeded") from err
        except ShuttingDown as err:
            raise ApiError(503, str(err), "server_error", "shutting_down") from err
        except RankwiseError as err:
            raise ApiError(400, str(err)) from err

    # Admin --------------------------------------------------------------------------------

    async def list_adapters(self, request: Request) -> Response:
        pool = self.engine.pool
        data = [
            {
                "id": name,
                "rank": adapter.rank,
                "modules": len(adapter.factors),
                "hot": adapter in pool.lru,
                "created": adapter.created,
            }
            for name, adapter in sorted(self.engine.adapters.items())
        ]
        loads = list(pool.load_times)
        mean_ms = 1000 * sum(loads) / len(loads) if loads else None
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "hot_slots": pool.slots - 1,
                "loads": len(loads),
                "mean_load_ms": mean_ms,
            }
        )

    async def add_adapter(self, request: Request) -> Response:
        body = await read_body(request, AddAdapter)
        try:
            adapter = await asyncio.to_thread(self.folder.add, body.name)
        except FileNotFoundError as err:
            raise ApiError(404, str(err), code="adapter_not_found", param="name") from err
        except RankwiseError as err:
            raise ApiError(400, str(err), param="name") from err
        card = {
            "id": adapter.name,
            "object": "model",
            "created": adapter.created,
            "owned_by": "rankwise",
            "parent": self.base_name,
            "rank": adapter.rank,
        }
        return JSONResponse(card, status_code=201)

    async def delete_adapter(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            removed = await asyncio.to_thread(self.folder.remove, name)
        except RankwiseError as err:
            raise ApiError(400, str(err), param="name") from err
        if not removed:
            raise unknown_model(name)
        return JSONResponse({"id": name, "object": "model", "deleted": True})


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


async def sse(
    ticket: Ticket, events: asyncio.Queue[Event], head: dict, shape: Shape, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, the finish reason, usage, then [DONE]."""
    try:
        if shape is chat_shape:
            yield data({**head, "choices": [shape.choice("", None, True)]})
        while True:
            event = await events.get()
            if isinstance(event, Failure):
                error = {
                    "message": event.message,
                    "type": "server_error",
                    "param": None,
                    "code": "generation_failed",
                }
                yield data({"error": error})
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


def unknown_model(name: str) -> ApiError:
    return ApiError(
        404, f"the model '{name}' does not exist", code="model_not_found", param="model"
    )


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


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(
        exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
    ).response()


async def on_crash(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal server error; see the server log", "server_error").response()

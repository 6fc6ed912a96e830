"""The OpenAI-compatible HTTP API over an ``Engine``: a Starlette app that uvicorn runs.

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (streamed as server-sent events
or not) pick the adapter by the ``model`` field: the base model's name means no adapter.
``/admin/adapters`` (``admin``) lists, adds and removes adapters; ``/health`` says how many
requests run and wait. Every error is OpenAI-shaped JSON (``http_errors``). With an API key
every endpoint needs ``Authorization: Bearer KEY`` (``auth``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from rankwise.errors import RankwiseError
from rankwise.serve.admin import Admin
from rankwise.serve.auth import Auth
from rankwise.serve.engine import Engine
from rankwise.serve.folder import AdapterFolder
from rankwise.serve.http_errors import HANDLERS, ApiError, unknown_model
from rankwise.serve.requests import (
    Event,
    Failure,
    GenerationRequest,
    Overloaded,
    ShuttingDown,
    Ticket,
    UnknownModel,
)
from rankwise.serve.responses import Shape, chat_shape, completion_shape, failure_body, sse
from rankwise.serve.schemas import ChatBody, CompletionBody, Sampling, read_body

DISCONNECT_POLL = 1.0  # seconds between checks that a non-streaming client is still there


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
        """The ASGI app; ``on_start`` and ``on_stop`` run at the server's start and end."""

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
            *Admin(self.engine, self.folder, self.base_name).routes(),
        ]
        app = Starlette(routes=routes, exception_handlers=HANDLERS, lifespan=lifespan)
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
        engine = self.engine
        return JSONResponse(
            {"status": "ok", "running": len(engine.running), "waiting": len(engine.queue.waiting)}
        )

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
                    return JSONResponse({"error": failure_body(event)}, status_code=503)
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

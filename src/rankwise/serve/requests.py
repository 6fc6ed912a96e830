"""What the engine takes and gives: requests, the events streamed back, and why it refuses one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from rankwise.errors import RankwiseError
from rankwise.serve.slots import HostAdapter

log = logging.getLogger("rankwise.serve")


class UnknownModel(RankwiseError):
    """A request named a model that is neither the base model nor a registered adapter."""


class Overloaded(RankwiseError):
    """Too many requests are running or waiting."""


class ShuttingDown(RankwiseError):
    """The engine is stopping and takes no new requests."""


@dataclass
class GenerationRequest:
    """One completion: prompt token ids, the adapter (None: base model) and sampling settings."""

    prompt: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks)


@dataclass
class Chunk:
    """Text produced since the last chunk; the last chunk has ``finish_reason`` and the usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Failure:
    """The request could not be finished; ``code`` says why, as the HTTP error's code."""

    message: str
    code: str = "generation_failed"  # or "shutting_down"


Event = Chunk | Failure


@dataclass(eq=False)
class Ticket:
    """A submitted request: where its events go, and a way to cancel it."""

    request: GenerationRequest
    adapter: HostAdapter | None  # None: the base model
    sink: Callable[[Event], None]
    cancelled: bool = False

    def cancel(self) -> None:
        """Drop the request at the next step (its client went away)."""
        self.cancelled = True

    def send(self, event: Event) -> None:
        """Deliver an event; a sink that fails (its client is gone) cancels the request."""
        try:
            self.sink(event)
        except Exception:
            log.debug("dropping an event for a request whose receiver is gone", exc_info=True)
            self.cancel()

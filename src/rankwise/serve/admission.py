"""Admission: the limits a request must meet, the queue it waits in, and who enters the batch.

Requests wait in arrival order. Each step admits them while the batch has room, the padded
prompt tokens of one prefill stay within a budget (so a burst of long prompts cannot stall
decoding for long) and a slot can hold the request's adapter; a request whose adapter finds no
free slot waits and later ones may pass it. A closed queue (the server is shutting down) refuses
new requests; the engine then answers the waiting ones instead of admitting them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rankwise.errors import RankwiseError
from rankwise.serve.requests import Failure, GenerationRequest, Overloaded, ShuttingDown, Ticket


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_prompt_tokens: int  # longest prompt
    max_new_tokens: int  # largest max_tokens
    context: int  # the model's context: prompt plus max_tokens
    vocab_size: int  # token ids run from 0 to vocab_size - 1

    def check(self, request: GenerationRequest) -> None:
        """Refuse prompts and lengths the server cannot serve, naming the limit."""
        n, limit = len(request.prompt), self.max_prompt_tokens
        if n == 0:
            raise RankwiseError("the prompt is empty")
        if n > limit:
            raise RankwiseError(f"the prompt has {n} tokens; this server accepts at most {limit}")
        if not 1 <= request.max_tokens <= self.max_new_tokens:
            raise RankwiseError(
                f"max_tokens must be between 1 and {self.max_new_tokens}, got {request.max_tokens}"
            )
        if n + request.max_tokens > self.context:
            raise RankwiseError(
                f"the prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                f"model's context of {self.context} tokens"
            )
        if any(t < 0 or t >= self.vocab_size for t in request.prompt):
            raise RankwiseError("the prompt holds token ids outside the vocabulary")


class Queue:
    """Waiting requests in arrival order, shared by the threads that submit and the engine's."""

    def __init__(self, capacity: int):
        self.capacity = capacity  # running plus waiting requests before new ones get Overloaded
        self.waiting: deque[Ticket] = deque()
        self.wakeup = threading.Condition()  # guards ``waiting``; signals new work
        self.closed = False

    def put(self, ticket: Ticket, running: int) -> None:
        """Queue a ticket behind ``running`` running requests; raises ShuttingDown or Overloaded."""
        with self.wakeup:
            if self.closed:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + running >= self.capacity:
                raise Overloaded(
                    f"too many requests: {running} running and {len(self.waiting)} waiting; "
                    "retry later"
                )
            self.waiting.append(ticket)
            self.wakeup.notify()

    def drop_cancelled(self) -> None:
        with self.wakeup:
            if any(t.cancelled for t in self.waiting):
                self.waiting = deque(t for t in self.waiting if not t.cancelled)

    def admit(
        self, room: int, budget: int, acquire: Callable[[Ticket], int | None]
    ) -> list[tuple[Ticket, int]]:
        """Take up to ``room`` waiting tickets, in order, whose padded prompts fit ``budget``.

        ``acquire`` gives a ticket its slot (None: no slot is free; the ticket keeps waiting).
        The first ticket enters whatever its length. Returns (ticket, slot) pairs.
        """
        with self.wakeup:
            candidates = list(self.waiting)
        admitted: list[tuple[Ticket, int]] = []
        longest = 0
        for ticket in candidates:
            if len(admitted) >= room:
                break
            length = max(longest, len(ticket.request.prompt))
            if admitted and length * (len(admitted) + 1) > budget:
                break
            slot = acquire(ticket)
            if slot is None:
                continue
            longest = length
            admitted.append((ticket, slot))
        with self.wakeup:
            for ticket, _ in admitted:
                self.waiting.remove(ticket)
        return admitted

    def fail_waiting(self, failure: Failure) -> None:
        """Answer every waiting request with ``failure`` and empty the queue."""
        with self.wakeup:
            tickets = list(self.waiting)
            self.waiting.clear()
        for ticket in tickets:
            ticket.send(failure)

    def close(self) -> None:
        """Refuse new requests from now on (the engine answers the waiting ones)."""
        with self.wakeup:
            self.closed = True
            self.wakeup.notify()

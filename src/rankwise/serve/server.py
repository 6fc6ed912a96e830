"""uvicorn's server with a shutdown that first drains the engine, so no request goes unanswered.

On SIGTERM uvicorn stops listening and waits up to ``timeout_graceful_shutdown`` for open
connections to finish, then cancels what is left, which drops those clients without a response.
``DrainingServer`` starts its shutdown by draining the engine thread instead: waiting requests
get a 503 at once and running ones may finish until ``ANSWER_SECONDS`` before uvicorn's limit,
when they get a 503 (or a stream's error event) too, with time left to send it.
"""

from __future__ import annotations

import socket

import uvicorn

from rankwise.serve.worker import EngineThread

ANSWER_SECONDS = 2.0  # of uvicorn's grace period, kept for sending the last responses


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose shutdown begins with ``worker.drain``."""

    def __init__(self, config: uvicorn.Config, worker: EngineThread):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown or 0
        self.worker.drain(max(0.0, grace - ANSWER_SECONDS))
        await super().shutdown(sockets)

"""The engine's own thread: steps while there is work, and drains the engine on shutdown.

Torch releases the GIL, so the HTTP server's event loop keeps answering while a step runs.
Shutting down has two stages: ``drain(grace)`` closes the queue (new requests get
``ShuttingDown``, waiting ones a shutdown failure at the next step) and gives the running ones
``grace`` seconds to finish, after which they get a shutdown failure too; ``stop`` then ends
the thread. Every request therefore ends with a last event, whatever state it was in.
"""

from __future__ import annotations

import logging
import threading
import time

from rankwise.serve.engine import SHUTDOWN, Engine
from rankwise.serve.requests import Failure

log = logging.getLogger("rankwise.serve")
CRASH = Failure("internal error while generating; see the server log")


class EngineThread:
    """Runs ``engine.step`` in a background thread until ``stop``."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.thread: threading.Thread | None = None
        self.deadline: float | None = None  # when draining: the running requests' last moment
        self.stopping = False

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop, name="rankwise-engine", daemon=True)
        self.thread.start()

    def drain(self, grace: float) -> None:
        """Take no new requests, answer the waiting ones, give running ones ``grace`` seconds."""
        self.deadline = time.monotonic() + grace
        self.engine.queue.close()

    def stop(self) -> None:
        """End the thread after its current step; whatever is left gets a shutdown failure."""
        self.engine.queue.close()
        with self.engine.queue.wakeup:
            self.stopping = True
            self.engine.queue.wakeup.notify()
        if self.thread is not None:
            self.thread.join()
        self.engine.fail_all(SHUTDOWN)

    def loop(self) -> None:
        wakeup = self.engine.queue.wakeup
        while True:
            with wakeup:
                wakeup.wait_for(lambda: self.stopping or self.engine.busy())
                if self.stopping:
                    return
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.engine.fail_running(SHUTDOWN)
            try:
                self.engine.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                self.engine.fail_all(CRASH)

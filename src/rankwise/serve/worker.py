"""The engine's own thread: steps while there is work, until ``stop``.

Torch releases the GIL, so the HTTP server's event loop keeps answering while a step runs.
"""

from __future__ import annotations

import logging
import threading

from rankwise.serve.engine import SHUTDOWN, Engine
from rankwise.serve.requests import Failure

log = logging.getLogger("rankwise.serve")
CRASH = Failure("internal error while generating; see the server log")


class EngineThread:
    """Runs ``engine.step`` in a background thread until ``stop``."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.thread: threading.Thread | None = None
        self.stopping = False

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop, name="rankwise-engine", daemon=True)
        self.thread.start()

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
            try:
                self.engine.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                self.engine.fail_all(CRASH)

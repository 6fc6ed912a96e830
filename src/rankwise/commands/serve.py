"""``rankwise serve``: an OpenAI-compatible server for one base model and many adapters.

Every PEFT adapter folder in ``--adapters DIR`` is served under its folder's name; folders added
to or removed from DIR while serving are picked up within ``--scan-interval`` seconds. Binds
127.0.0.1 unless told otherwise; SIGTERM finishes the requests in flight and exits with 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rankwise.commands.options import add_options, parse_options
from rankwise.errors import RankwiseError
from rankwise.models import ModelOptions
from rankwise.options import option
from rankwise.serve.engine import Engine, EngineConfig

LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_RANK = 16  # max_rank when DIR holds no adapter yet
GRACE_SECONDS = 30  # how long SIGTERM waits for requests in flight


@dataclass
class ServeOptions(EngineConfig, ModelOptions):
    """``rankwise serve``: the model, the adapters folder, the address and the engine's limits.

    The two bases declare disjoint settings; ``max_rank`` unset means the largest rank in DIR.
    """

    adapters: str = option("", "folder whose sub-folders are PEFT adapters, served by name")
    max_rank: int | None = option(
        None,
        f"largest adapter rank accepted (unset: the largest in DIR, or {DEFAULT_RANK})",
        within="[1, inf)",
    )
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(8000, "port (0 picks a free one)", within="[0, 65535]")
    api_key: str | None = option(
        None,
        "require 'Authorization: Bearer KEY' (unset: $RANKWISE_API_KEY); admin endpoints are "
        "off without one",
    )
    scan_interval: float = option(
        2.0,
        "seconds between scans of DIR for added or removed adapters (0: off)",
        within="[0, inf)",
    )
    threads: int | None = option(
        None, "CPU threads for the model (unset: torch's)", within="[1, inf)"
    )
    log_level: str = option("info", "server log level", choices=LOG_LEVELS)

    def check(self) -> None:
        super().check()
        if not self.adapters:
            raise RankwiseError("give the adapter folder to serve: --adapters DIR")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve many adapters on one base model over an OpenAI-compatible API"
    )
    add_options(parser, ServeOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from rankwise.serve.api import Api
    from rankwise.serve.folder import AdapterFolder, largest_rank
    from rankwise.serve.server import DrainingServer
    from rankwise.serve.worker import EngineThread

    options = parse_options(args)
    logging.basicConfig(
        level=options.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if not Path(options.adapters).is_dir():
        raise RankwiseError(f"adapter directory '{options.adapters}' does not exist")
    sock = listen(options.host, options.port)  # before the slow model load: a busy port fails fast
    if options.threads:
        torch.set_num_threads(options.threads)
    loaded = options.load()
    rank = options.max_rank or largest_rank(options.adapters) or DEFAULT_RANK
    engine = Engine(loaded.model, loaded.tokenizer, replace(options, max_rank=rank))
    worker = EngineThread(engine)
    folder = AdapterFolder(options.adapters, engine, loaded.name)
    folder.scan()

    def start() -> None:
        worker.start()
        if options.scan_interval > 0:
            folder.watch(options.scan_interval)

    def stop() -> None:
        folder.stop()
        worker.stop()

    api_key = options.api_key or os.environ.get("RANKWISE_API_KEY")
    app = Api(engine, folder, loaded.name).app(api_key, start, stop)
    server = DrainingServer(
        uvicorn.Config(
            app,
            log_level=options.log_level,
            timeout_graceful_shutdown=GRACE_SECONDS,
            access_log=options.log_level == "debug",
        ),
        worker,
    )
    # uvicorn re-raises the signal it shut down on; a no-op handler makes SIGTERM a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: None)
    host, port = sock.getsockname()[:2]
    print(
        f"rankwise serve: {loaded.name} with {len(engine.adapters)} adapters on "
        f"http://{host}:{port}",
        flush=True,
    )
    server.run(sockets=[sock])
    print("rankwise serve: stopped", flush=True)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise RankwiseError(f"cannot listen on {host}:{port}: {err}") from err


def main(argv: Sequence[str] | None = None) -> int:
    """``rankwise serve`` on its own: ``python -m rankwise.commands.serve --adapters DIR ...``."""
    from rankwise.cli import main as rankwise

    words = list(sys.argv[1:] if argv is None else argv)
    debug = ["--debug"] if "--debug" in words else []
    return rankwise([*debug, "serve", *(w for w in words if w != "--debug")])


if __name__ == "__main__":
    sys.exit(main())

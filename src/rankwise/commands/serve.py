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
from pathlib import Path

from rankwise.errors import RankwiseError
from rankwise.models import ModelOptions
from rankwise.serve.engine import Engine, EngineConfig

DEFAULT_RANK = 16  # --max-rank when DIR holds no adapter yet
# The least value each numeric flag accepts.
MINIMUMS = {
    "max_batch": 1,
    "max_queued": 0,
    "hot_slots": 0,
    "max_rank": 1,
    "max_prompt_tokens": 1,
    "max_new_tokens": 1,
    "port": 0,
    "threads": 1,
}
GRACE_SECONDS = 30  # how long SIGTERM waits for requests in flight


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve many adapters on one base model over an OpenAI-compatible API"
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    parser.add_argument(
        "--adapters",
        required=True,
        metavar="DIR",
        help="folder whose sub-folders are PEFT adapters, served by folder name",
    )
    ModelOptions.add_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("RANKWISE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default $RANKWISE_API_KEY); "
        "admin endpoints are off without one",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help="sequences decoded together per step",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=defaults.max_queued,
        help="requests waiting beyond the batch before new ones get 429",
    )
    parser.add_argument(
        "--hot-slots",
        type=int,
        default=defaults.hot_slots,
        help="adapters held in the layers at once (0: --max-batch); the rest wait in host memory",
    )
    parser.add_argument(
        "--max-rank",
        type=int,
        default=None,
        help=f"largest adapter rank accepted (default: the largest in DIR, or {DEFAULT_RANK})",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=defaults.max_prompt_tokens,
        help="longest prompt accepted",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help="largest max_tokens accepted",
    )
    parser.add_argument(
        "--scan-interval",
        type=float,
        default=2.0,
        help="seconds between scans of DIR for added or removed adapters (0: off)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for the model (default: torch's)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="server log level",
    )


def run(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from rankwise.serve.api import Api
    from rankwise.serve.folder import AdapterFolder, largest_rank
    from rankwise.serve.server import DrainingServer
    from rankwise.serve.worker import EngineThread

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for flag, least in MINIMUMS.items():
        value = getattr(args, flag)
        if value is not None and value < least:
            raise RankwiseError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if not Path(args.adapters).is_dir():
        raise RankwiseError(f"adapter directory '{args.adapters}' does not exist")
    sock = listen(args.host, args.port)  # before the slow model load, so a busy port fails fast
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = ModelOptions.from_args(args).load()
    config = EngineConfig(
        max_batch=args.max_batch,
        max_queued=args.max_queued,
        hot_slots=args.hot_slots,
        max_rank=args.max_rank or largest_rank(args.adapters) or DEFAULT_RANK,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
    )
    engine = Engine(loaded.model, loaded.tokenizer, config)
    worker = EngineThread(engine)
    folder = AdapterFolder(args.adapters, engine, loaded.name)
    folder.scan()

    def start() -> None:
        worker.start()
        if args.scan_interval > 0:
            folder.watch(args.scan_interval)

    def stop() -> None:
        folder.stop()
        worker.stop()

    app = Api(engine, folder, loaded.name).app(args.api_key, start, stop)
    server = DrainingServer(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            timeout_graceful_shutdown=GRACE_SECONDS,
            access_log=args.log_level == "debug",
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
    parser = argparse.ArgumentParser(
        prog="rankwise serve", description="Serve many adapters on one base model (OpenAI API)."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except RankwiseError as err:
        if args.debug:
            raise
        print(f"rankwise: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``rankwise`` command: one entry point, one module per verb under ``rankwise.commands``.

Every verb module defines ``add_parser(subparsers)`` (which sets ``func``) and the function it
runs. A ``RankwiseError`` is printed as one line and the exit status is 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import transformers

from rankwise.errors import RankwiseError

# Verb modules in the order ``rankwise --help`` lists them.
COMMANDS = (
    "info",
    "generate",
    "train",
    "eval",
    "mix",
    "merge",
    "compress",
    "quantize",
    "compensate",
    "serve",
    "fed",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankwise", description="Low-rank adapters for language models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"rankwise.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    transformers.logging.disable_progress_bar()  # rankwise draws its own bars for long work
    try:
        args.func(args)
    except RankwiseError as err:
        if args.debug:
            raise
        print(f"rankwise: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rankwise: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

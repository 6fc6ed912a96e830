"""``rankwise merge``: merge LoRA adapters into one PEFT adapter (linear, ties, dare_*, lego)."""

from __future__ import annotations

import argparse

from rankwise.commands.options import add_options, parse_options
from rankwise.merge import METHODS, MergeConfig, run_merge


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help=f"merge LoRA adapters into one ({', '.join(METHODS)})",
        description="Merge PEFT-format LoRA adapters into one. Settings may come from a YAML "
        "file whose keys are the flag names; flags given on the command line override it.",
    )
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER", help="adapter folders")
    parser.add_argument("-o", "--output", default=None, help="folder for the merged adapter")
    add_options(parser, MergeConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    config = parse_options(args)
    result = run_merge(config)
    print(f"merged {len(config.adapters)} adapters with {result.report.summary()}")
    print(f"wrote {config.output}")

"""``rankwise merge``: merge LoRA adapters into one PEFT adapter, or report their interference."""

from __future__ import annotations

import argparse

from rankwise.commands.options import add_options, parse_options
from rankwise.merge import METHODS, MergeConfig, run_merge
from rankwise.merge.config import run_report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help=f"merge LoRA adapters into one ({', '.join(METHODS)})",
        description="Merge PEFT-format LoRA adapters into one. Settings may come from a YAML "
        "file whose keys are the flag names; flags given on the command line override it. "
        "Every method's own settings are flags too (a setting of another method is an error). "
        "--report prints how the adapters interfere, module by module.",
    )
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER", help="adapter folders")
    parser.add_argument("-o", "--output", default=None, help="folder for the merged adapter")
    parser.add_argument(
        "--report",
        action="store_const",
        const=True,
        default=None,
        help="print the adapters' interference per pair and module (cosine of the updates, "
        "overlap of their input and output subspaces); with -o, merge as well",
    )
    add_options(parser, MergeConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    config = parse_options(args)
    if config.report:
        print(run_report(config).table())
    if config.output:
        result = run_merge(config)
        print(f"merged {len(config.adapters)} adapters with {result.report.summary()}")
        print(f"wrote {config.output}")

"""``rankwise train``: train a LoRA adapter from a YAML config, any key overridable by a flag."""

from __future__ import annotations

import argparse

from rankwise.commands.options import add_options, parse_options
from rankwise.train import TrainConfig, TrainResult, train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA adapter (PEFT format)",
        description="Train a LoRA adapter. Every YAML key is also a flag: --max-steps 100 etc.",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    add_options(parser, TrainConfig, positional_config=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    report(train(parse_options(args), resume=args.resume), "adapter")


def report(result: TrainResult, what: str) -> None:
    """One line on how a finished run went and where its result is."""
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s "
        f"({result.tokens_per_second:.0f} tokens/s): loss {result.final_loss:.4f}{val}; "
        f"{what} written to {result.adapter_dir}"
    )

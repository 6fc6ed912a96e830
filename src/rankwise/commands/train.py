"""``rankwise train``: train a LoRA adapter from a YAML config, any key overridable by a flag."""

from __future__ import annotations

import argparse

from rankwise.train import train
from rankwise.train.config import add_config_flags, config_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA adapter (PEFT format)",
        description="Train a LoRA adapter. Every YAML key is also a flag: --max-steps 100 etc.",
    )
    parser.add_argument("config", nargs="?", default=None, help="YAML file of training settings")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    add_config_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    result = train(config_from_args(args), resume=args.resume)
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s "
        f"({result.tokens_per_second:.0f} tokens/s): loss {result.final_loss:.4f}{val}; "
        f"adapter written to {result.adapter_dir}"
    )

"""``rankwise merge``: merge LoRA adapters into one PEFT adapter (linear, ties, dare_*, lego)."""

from __future__ import annotations

import argparse

from rankwise.merge import METHODS, MergeConfig, load_config, run_merge


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge LoRA adapters into one",
        description="Merge PEFT-format LoRA adapters into one. Settings may come from a YAML "
        "file whose keys are the flag names (adapters, output, method, weights, density, rank, "
        "seed); flags given on the command line override it.",
    )
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER", help="adapter folders")
    parser.add_argument("--config", default=None, help="YAML file of merge settings")
    parser.add_argument("--method", choices=list(METHODS), default=None, help="default: linear")
    parser.add_argument(
        "--weights", type=float, nargs="+", default=None, help="one per adapter (default: 1 each)"
    )
    parser.add_argument(
        "--density",
        type=float,
        default=None,
        help="fraction of entries kept by ties (default 0.2) and dare_* (default 0.5)",
    )
    parser.add_argument(
        "--rank", type=int, default=None, help="merged rank (default: the largest input rank)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for dare_* and lego")
    parser.add_argument("-o", "--output", default=None, help="folder for the merged adapter")
    parser.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> MergeConfig:
    """The YAML settings (if any) overridden by every flag given on the command line."""
    settings = load_config(args.config) if args.config else {}
    for key in ("method", "weights", "density", "rank", "seed", "output"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.adapters:
        settings["adapters"] = args.adapters
    return MergeConfig(**{k: v for k, v in settings.items() if v is not None})


def run(args: argparse.Namespace) -> None:
    config = config_from(args)
    result = run_merge(config)
    print(f"merged {len(config.adapters)} adapters with {result.report.summary()}")
    print(f"wrote {config.output}")

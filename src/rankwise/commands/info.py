"""``rankwise info``: what a model is and which of its linear layers adapters can target."""

from __future__ import annotations

import argparse
from collections import defaultdict

from rankwise.adapters.inject import adaptable_modules
from rankwise.architectures import linear_shape
from rankwise.commands.options import add_options, parse_options
from rankwise.models import ModelOptions
from rankwise.quantize import weight_report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="describe a model and its adaptable modules")
    add_options(parser, ModelOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    loaded = parse_options(args).load()
    model = loaded.model
    config = model.config
    report = weight_report(model)  # quantised layers count their weights, not their packed bytes
    print(f"model:       {loaded.name} ({config.model_type}, {type(model).__name__})")
    print(f"parameters:  {report.parameters:,}")
    print(f"dtype:       {next(model.parameters()).dtype} on {loaded.device}")
    print(f"layers:      {config.num_hidden_layers}, hidden size {config.hidden_size}")
    print(
        f"weights:     {report.weight_bytes:,} bytes, "
        f"{report.bits_per_parameter:.2f} bits/parameter"
    )
    if report.quantized_weights:
        print(
            f"quantised:   {report.quantized_weights:,} linear weights in "
            f"{report.quantized_bytes:,} bytes, {report.bits_per_quantized_weight:.3f} bits/weight"
        )
    groups: dict[tuple[str, int, int], int] = defaultdict(int)
    for name, linear in adaptable_modules(model).items():
        kind = name.rpartition(".")[2]
        groups[kind, *linear_shape(linear)] += 1
    print("adaptable linear modules (target_modules names):")
    for (kind, fan_in, fan_out), count in groups.items():
        print(f"  {kind:<12} x{count:<4} in {fan_in:>6} -> out {fan_out:<6}")

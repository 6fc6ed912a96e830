"""``rankwise compensate``: a training-free low-rank adapter closing a compressed base's gap."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from rankwise.adapters.peft_format import write_adapter
from rankwise.commands.options import add_options, parse_options
from rankwise.compress.calibration import DEFAULT_DATA, calibration_data
from rankwise.compress.storage import check_output_folder
from rankwise.errors import RankwiseError
from rankwise.models import ModelOptions, load_model
from rankwise.options import option
from rankwise.quantize.compensate import compensate
from rankwise.quantize.eora import COMPENSATORS


@dataclass
class CompensateOptions(ModelOptions):
    """``--model`` is the compressed base (and ``--quantize`` may quantise it on load)."""

    reference: str | None = option(None, "the original model the compressed one came from")
    method: str = option("eora", "compensation method", choices=lambda: list(COMPENSATORS))
    rank: int = option(16, "rank of the adapter written", within="[1, inf)")
    lora_alpha: float = option(32.0, "lora_alpha of the adapter (its B is divided by alpha/r)")
    calib: str = option(DEFAULT_DATA, "calibration data: a data spec or path")
    samples: int = option(32, "calibration sequences", within="[1, inf)")
    seq_len: int = option(256, "tokens per calibration sequence", within="[2, inf)")
    seed: int = option(0, "which calibration blocks are drawn")
    output: str = option("", "folder to write the adapter into (PEFT format)")

    def check(self) -> None:
        super().check()
        if not self.output:
            raise RankwiseError("give the folder to write the adapter into (-o)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compensate",
        help=f"low-rank adapter compensating a compressed base ({', '.join(COMPENSATORS)})",
    )
    parser.add_argument("-o", "--output", default=None, help="folder for the adapter")
    add_options(parser, CompensateOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    options = parse_options(args)
    output = check_output_folder(options.output)
    loaded = options.load()
    reference = load_model(options.reference, "float32", loaded.device).model
    input_ids = None
    if COMPENSATORS[options.method].prepare is not None:
        input_ids = calibration_data(
            loaded.tokenizer,
            options.calib,
            samples=options.samples,
            seq_len=options.seq_len,
            seed=options.seed,
        ).input_ids
    result = compensate(
        loaded.model,
        reference,
        options.method,
        options.rank,
        options.lora_alpha,
        input_ids,
        base_model=options.model,
    )
    write_adapter(result.adapter, output)
    layers = len(result.adapter.factors)
    print(f"wrote {output}: {options.method} rank {options.rank} on {layers} layers")
    if result.skipped:
        print(f"skipped {len(result.skipped)} layers with no counterpart in the reference")

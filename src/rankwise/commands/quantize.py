"""``rankwise quantize``: write a quantised model (NF-k, or LoftQ / LQ-LoRA with an adapter)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rankwise.adapters.peft_format import LoraWeights
from rankwise.commands.options import add_options, parse_options
from rankwise.errors import RankwiseError
from rankwise.models import ModelOptions
from rankwise.options import MethodSettings, Options, flagless, option
from rankwise.quantize import weight_report
from rankwise.quantize.registry import METHODS
from rankwise.quantize.storage import ADAPTER, save_quantized


@dataclass
class QuantizeOptions(MethodSettings, ModelOptions):
    """``rankwise quantize``: the method, its settings (flat flags), the block size, the output."""

    method: str | None = option(None, "quantisation method", choices=lambda: list(METHODS))
    output: str = option("", "folder to write the quantised model into")
    settings: dict[str, Any] = flagless({}, "the chosen method's own settings")

    def check(self) -> None:
        super().check()
        if self.quantize is not None:
            raise RankwiseError("rankwise quantize takes --method, not --quantize")
        for name, flag in (("method", "--method"), ("output", "-o")):
            if getattr(self, name) in (None, ""):
                raise RankwiseError(f"give the {name} to quantize with ({flag})")

    @classmethod
    def methods(cls) -> Mapping[str, type[Options]]:
        return METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help=f"write a quantised base model ({', '.join(METHODS)})",
        description="Quantise the base model's linear layers and write it (load it with "
        "--model OUT); LoftQ and LQ-LoRA also write their low-rank part as the PEFT adapter "
        "OUT/adapter.",
    )
    parser.add_argument("-o", "--output", default=None, help="folder to write the model into")
    add_options(parser, QuantizeOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    options = parse_options(args)
    method = METHODS[options.method].from_mapping(options.settings, "method settings")
    loaded = options.load()
    model = loaded.model
    input_ids = method.calibration(loaded.tokenizer)  # LQ-LoRA's Fisher; None for the others
    factors = method.quantize(model, options.quant_block, input_ids)
    adapter = None
    if factors:
        # quantised layers are [out, in] maps whatever the original layout: no fan_in_fan_out
        alphas = dict.fromkeys(factors, method.adapter_alpha())
        adapter = LoraWeights(factors, alphas, base_model=options.output)
    report = weight_report(model)
    record = {
        "method": options.method,
        "settings": options.settings,
        "block": options.quant_block,
        "base_model": loaded.name,
        "bits_per_quantized_weight": report.bits_per_quantized_weight,
        "bits_per_parameter": report.bits_per_parameter,
    }
    save_quantized(model, loaded.tokenizer, options.output, record, adapter)
    print(
        f"wrote {options.output}: {report.weight_bytes:,} bytes of weights, "
        f"{report.bits_per_quantized_weight:.3f} bits per quantised weight"
    )
    if adapter is not None:
        print(f"initial adapter (rank {method.rank}): {options.output}/{ADAPTER}")

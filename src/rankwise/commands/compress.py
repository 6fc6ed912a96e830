"""``rankwise compress``: post-training low-rank compression of the base model."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rankwise.commands.options import add_options, parse_options
from rankwise.compress import METHODS, compress, save_compressed
from rankwise.compress.calibration import DEFAULT_DATA
from rankwise.compress.storage import check_output_folder
from rankwise.errors import RankwiseError
from rankwise.models import ModelOptions
from rankwise.options import MethodSettings, Options, flagless, option


@dataclass
class CompressOptions(MethodSettings, ModelOptions):
    """``rankwise compress``: the method, how much to remove, the calibration data, the output.

    The method's own settings (``damping``, ``alpha``, ``components``, ...) are flat keys and
    flags too; ``settings`` holds those of the chosen method.
    """

    method: str | None = option(None, "compression method", choices=lambda: list(METHODS))
    ratio: float | list[float] | None = option(
        None,
        "fraction of decoder linear-layer parameters to remove, e.g. 0.2, or one value per "
        "layer separated by commas (mixed rank)",
        within="[0, 1)",
    )
    calib: str = option(DEFAULT_DATA, "calibration data: a data spec or path")
    samples: int = option(32, "calibration sequences", within="[1, inf)")
    seq_len: int = option(256, "tokens per calibration sequence", within="[2, inf)")
    seed: int = option(0, "which calibration blocks are drawn")
    output: str = option("", "folder to write the compressed model into")
    settings: dict[str, Any] = flagless({}, "the chosen method's own settings")

    def check(self) -> None:
        super().check()
        for name, flag in (("method", "--method"), ("ratio", "--ratio"), ("output", "-o")):
            if getattr(self, name) in (None, ""):
                raise RankwiseError(f"give the {name} to compress with ({flag})")

    @classmethod
    def methods(cls) -> Mapping[str, type[Options]]:
        return METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress",
        help=f"compress the base model's linear layers ({', '.join(METHODS)})",
        description="Compress the base model. Every method's settings are flags (a setting of "
        "another method is an error); YAML keys are the same names.",
    )
    parser.add_argument("-o", "--output", default=None, help="folder to write the model into")
    add_options(parser, CompressOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    options = parse_options(args)
    check_output_folder(options.output)  # before minutes of calibration, not after
    loaded = options.load()
    record = compress(
        loaded.model,
        loaded.tokenizer,
        options.method,
        options.ratio,
        data=options.calib,
        samples=options.samples,
        seq_len=options.seq_len,
        seed=options.seed,
        options=options.settings,
        base_model=loaded.name,
    )
    plain = save_compressed(loaded.model, loaded.tokenizer, options.output, record)
    kind = "a plain transformers model" if plain else "rankwise's compressed format"
    print(f"wrote {options.output} ({kind})")
    print(cost_table(record["costs"]["before"], record["costs"]["after"]))


def cost_table(before: dict, after: dict) -> str:
    """Before/after costs as aligned text lines."""
    rows = [
        ("parameters", "params"),
        ("decoder linear parameters", "linear_params"),
        (f"FLOPs/token (context {before['context']})", "flops_per_token"),
        ("KV-cache bytes/token", "kv_bytes_per_token"),
    ]
    lines = [f"{'':<30}{'before':>16}{'after':>16}{'change':>9}"]
    for label, key in rows:
        change = after[key] / before[key] - 1
        lines.append(f"{label:<30}{before[key]:>16,}{after[key]:>16,}{change:>+9.1%}")
    return "\n".join(lines)

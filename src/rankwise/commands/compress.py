"""``rankwise compress``: post-training low-rank compression of the base model."""

from __future__ import annotations

import argparse

from rankwise.compress import METHODS, compress, save_compressed
from rankwise.compress.a3 import COMPONENTS
from rankwise.compress.calibration import DEFAULT_DATA
from rankwise.compress.storage import check_output_folder
from rankwise.models import ModelOptions


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress", help="compress the base model's linear layers (svd, asvd, svd-llm, a3)"
    )
    ModelOptions.add_flags(parser)
    parser.add_argument("--method", required=True, choices=list(METHODS), help="compression method")
    parser.add_argument(
        "--ratio",
        required=True,
        type=ratios,
        help="fraction of decoder linear-layer parameters to remove, e.g. 0.2, or one value "
        "per layer separated by commas (mixed rank)",
    )
    parser.add_argument(
        "--calib", default=DEFAULT_DATA, help=f"calibration data spec or path ({DEFAULT_DATA})"
    )
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--seed", type=int, default=0, help="which calibration blocks are drawn")
    parser.add_argument(
        "--damping", type=float, help="svd-llm, a3: diagonal damping relative to its mean"
    )
    parser.add_argument("--alpha", type=float, help="asvd: activation scaling exponent")
    parser.add_argument(
        "--components",
        type=lambda text: tuple(text.split(",")),
        help=f"a3: components to shrink, comma-separated from {','.join(COMPONENTS)}",
    )
    parser.add_argument("-o", "--output", required=True, help="folder to write the model into")
    parser.set_defaults(func=run)


def ratios(text: str) -> float | list[float]:
    """One ratio, or a comma-separated list of per-layer ratios."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a ratio or list of ratios: '{text}'") from err
    return values[0] if len(values) == 1 else values


def run(args: argparse.Namespace) -> None:
    check_output_folder(args.output)  # before minutes of calibration, not after
    loaded = ModelOptions.from_args(args).load()
    options = {
        key: value
        for key, value in (
            ("damping", args.damping),
            ("alpha", args.alpha),
            ("components", args.components),
        )
        if value is not None
    }
    record = compress(
        loaded.model,
        loaded.tokenizer,
        args.method,
        args.ratio,
        data=args.calib,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        options=options,
        base_model=loaded.name,
    )
    plain = save_compressed(loaded.model, loaded.tokenizer, args.output, record)
    kind = "a plain transformers model" if plain else "rankwise's compressed format"
    print(f"wrote {args.output} ({kind})")
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

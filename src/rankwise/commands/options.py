"""Command-line options that several verbs share, declared once."""

from __future__ import annotations

import argparse

from rankwise.models import DEFAULT_MODEL, DTYPES


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, as every verb that loads a base model takes them."""
    parser.add_argument(
        "--model",
        default=None,
        help=f"Hugging Face model folder or .gguf file (default: the embedded {DEFAULT_MODEL})",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype")

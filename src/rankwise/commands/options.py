"""Command-line options that several verbs share, declared once."""

from __future__ import annotations

import argparse

from rankwise.adapters import load_adapter
from rankwise.errors import RankwiseError
from rankwise.models import DEFAULT_MODEL, DTYPES, LoadedModel, load_model
from rankwise.routers import load_mixture


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, as every verb that loads a base model takes them."""
    parser.add_argument(
        "--model",
        default=None,
        help=f"Hugging Face model folder or .gguf file (default: the embedded {DEFAULT_MODEL})",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype")


def add_adapted_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, plus --adapter or --mixture to put on the model."""
    add_model_options(parser)
    parser.add_argument("--adapter", default=None, help="PEFT-format LoRA adapter folder")
    parser.add_argument("--mixture", default=None, help="mixture folder from `rankwise mix train`")


def load_adapted_model(args: argparse.Namespace) -> LoadedModel:
    """The model ``add_adapted_model_options`` describes, with its adapter or mixture attached."""
    if args.adapter and args.mixture:
        raise RankwiseError("give --adapter or --mixture, not both")
    loaded = load_model(args.model, args.dtype)
    if args.adapter:
        load_adapter(loaded.model, args.adapter)
    if args.mixture:
        load_mixture(loaded.model, args.mixture)
    return loaded

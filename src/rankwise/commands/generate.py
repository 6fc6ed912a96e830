"""``rankwise generate``: complete a prompt with the base model, optionally through an adapter."""

from __future__ import annotations

import argparse
import sys

from rankwise.commands.options import add_adapted_model_options, load_adapted_model
from rankwise.errors import RankwiseError
from rankwise.evaluate.generation import Sampling, generate


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text, streamed to the terminal")
    add_adapted_model_options(parser)
    parser.add_argument("prompt", help="the prompt (the chat template is applied for chat models)")
    add_sampling_options(parser)
    parser.set_defaults(func=run)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def sampling_from(args: argparse.Namespace) -> Sampling:
    """Validated sampling settings from parsed arguments."""
    if args.max_new_tokens < 1:
        raise RankwiseError("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise RankwiseError("--temperature must be >= 0 and --top-p in (0, 1]")
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def run(args: argparse.Namespace) -> None:
    sampling = sampling_from(args)
    loaded = load_adapted_model(args)
    generate(loaded.model, loaded.tokenizer, args.prompt, sampling, stream=True)
    sys.stdout.flush()

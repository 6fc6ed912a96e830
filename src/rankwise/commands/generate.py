"""``rankwise generate``: complete a prompt with the base model, optionally through an adapter."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from rankwise.commands.options import AdaptedModelOptions, add_options, parse_options
from rankwise.evaluate.generation import Sampling, generate
from rankwise.options import option


@dataclass
class GenerateOptions(AdaptedModelOptions):
    """``rankwise generate``: the prompt and how to sample its completion."""

    prompt: str = option("", "the prompt (the chat template is applied for chat models)")
    max_new_tokens: int = option(128, "tokens to generate at most", within="[1, inf)")
    temperature: float = option(0.0, "sampling temperature (0: greedy)", within="[0, inf)")
    top_p: float = option(1.0, "nucleus sampling threshold", within="(0, 1]")
    seed: int | None = option(None, "seed for sampling")

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_p, self.seed)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text, streamed to the terminal")
    parser.add_argument("prompt", help="the prompt (the chat template is applied for chat models)")
    add_options(parser, GenerateOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    options = parse_options(args)
    loaded = options.load()
    generate(loaded.model, loaded.tokenizer, options.prompt, options.sampling(), stream=True)
    sys.stdout.flush()

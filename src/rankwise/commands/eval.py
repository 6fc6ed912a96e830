"""``rankwise eval``: perplexity on text and exact match on task data (table and JSON)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from rankwise.commands.options import AdaptedModelOptions, add_options, parse_options
from rankwise.data import load_dataset_spec
from rankwise.errors import RankwiseError
from rankwise.evaluate.accuracy import exact_match
from rankwise.evaluate.perplexity import perplexity
from rankwise.options import option

POSITIVE = "[1, inf)"


@dataclass
class EvalOptions(AdaptedModelOptions):
    """``rankwise eval``: the data, the split and how perplexity and exact match are taken."""

    data: str = option("", "a path, task:NAME[,NAME...], task:all or corpus:python-docs")
    split: str = option("test", "split of a built-in source")
    examples: int = option(100, "test examples per task", within=POSITIVE)
    window: int = option(512, "perplexity window (tokens)", within=POSITIVE)
    stride: int = option(256, "perplexity stride (tokens)", within=POSITIVE)
    max_tokens: int | None = option(None, "cap on the tokens perplexity reads", within=POSITIVE)
    batch_size: int = option(16, "prompts per generation batch", within=POSITIVE)
    max_new_tokens: int = option(32, "tokens generated per answer", within=POSITIVE)
    json: str | None = option(None, "also write the results to this JSON file")

    def check(self) -> None:
        super().check()
        if not self.data:
            raise RankwiseError("give the data to evaluate on: --data PATH or task:NAME")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="perplexity on text, exact match on task data")
    add_options(parser, EvalOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    options = parse_options(args)
    records = load_dataset_spec(options.data, split=options.split, n=options.examples).records
    texts = [r["text"] for r in records if "text" in r]
    prompted = [r for r in records if "prompt" in r]
    if not texts and not prompted:
        raise RankwiseError(f"'{options.data}' has neither text nor prompt/completion records")
    loaded = options.load()
    results: dict = {
        "model": loaded.name,
        "adapter": options.adapter,
        "mixture": options.mixture,
        "data": options.data,
    }
    rows = []
    if texts:
        ppl = perplexity(
            loaded.model,
            loaded.tokenizer,
            texts,
            window=options.window,
            stride=options.stride,
            batch_size=max(1, options.batch_size // 4),
            max_tokens=options.max_tokens,
        )
        results["perplexity"] = ppl
        rows.append(("perplexity", f"{ppl:.3f}", f"{len(texts)} texts"))
    if prompted:
        tallies = exact_match(
            loaded.model, loaded.tokenizer, prompted, options.batch_size, options.max_new_tokens
        )
        results["exact_match"] = tallies
        for task, tally in tallies.items():
            rows.append(
                (
                    f"exact match: {task}",
                    f"{tally['accuracy']:.3f}",
                    f"{tally['correct']}/{tally['total']}",
                )
            )
    width = max(len(r[0]) for r in rows)
    for name, value, detail in rows:
        print(f"{name:<{width}}  {value:>8}  {detail}")
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))

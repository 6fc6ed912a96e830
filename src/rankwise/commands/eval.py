"""``rankwise eval``: perplexity on text and exact match on task data (table and JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rankwise.commands.options import add_adapted_model_options, load_adapted_model
from rankwise.data import load_dataset_spec
from rankwise.errors import RankwiseError
from rankwise.evaluate.accuracy import exact_match
from rankwise.evaluate.perplexity import perplexity


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="perplexity on text, exact match on task data")
    add_adapted_model_options(parser)
    parser.add_argument(
        "--data", required=True, help="a path, task:NAME[,NAME...] / task:all, corpus:python-docs"
    )
    parser.add_argument("--split", default="test", help="split of a built-in source")
    parser.add_argument("--examples", type=int, default=100, help="test examples per task")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    parser.add_argument("--stride", type=int, default=256, help="perplexity stride (tokens)")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on perplexity tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    records = load_dataset_spec(args.data, split=args.split, n=args.examples).records
    loaded = load_adapted_model(args)
    texts = [r["text"] for r in records if "text" in r]
    prompted = [r for r in records if "prompt" in r]
    if not texts and not prompted:
        raise RankwiseError(f"'{args.data}' has neither text nor prompt/completion records")
    results: dict = {
        "model": loaded.name,
        "adapter": args.adapter,
        "mixture": args.mixture,
        "data": args.data,
    }
    rows = []
    if texts:
        ppl = perplexity(
            loaded.model,
            loaded.tokenizer,
            texts,
            window=args.window,
            stride=args.stride,
            batch_size=max(1, args.batch_size // 4),
            max_tokens=args.max_tokens,
        )
        results["perplexity"] = ppl
        rows.append(("perplexity", f"{ppl:.3f}", f"{len(texts)} texts"))
    if prompted:
        tallies = exact_match(
            loaded.model, loaded.tokenizer, prompted, args.batch_size, args.max_new_tokens
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
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

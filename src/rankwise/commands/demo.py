"""``rankwise demo``: the README's first command: train a small adapter on a built-in task and
show the base model's and the adapter's answers and exact match side by side."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from rankwise.commands.options import add_options, parse_options
from rankwise.data import TASKS, get_task
from rankwise.evaluate.accuracy import exact_match
from rankwise.models import ModelOptions
from rankwise.options import option
from rankwise.train import TrainConfig, train
from rankwise.train.config import TRAIN_DTYPES


@dataclass
class DemoOptions(ModelOptions):
    """``rankwise demo``: which built-in task, how long to train, where the adapter goes."""

    dtype: str = option(
        "auto",
        "dtype of the frozen base weights (auto: bfloat16 where computed natively, else float32)",
        choices=TRAIN_DTYPES,
    )
    task: str = option("reverse_words", "built-in task to learn", choices=lambda: sorted(TASKS))
    steps: int = option(30, "optimizer steps (batch 8)", within="[1, inf)")
    examples: int = option(24, "test prompts to score", within="[1, inf)")
    output_dir: str | None = option(None, "folder for the adapter (unset: runs/demo-<time>)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train a small adapter on a built-in task")
    add_options(parser, DemoOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    options = parse_options(args)
    test = get_task(options.task).test_set(options.examples)
    base = options.load()
    print(f"{base.name}: scoring the base model on {len(test)} '{options.task}' test prompts...")
    before = exact_match(base.model, base.tokenizer, test, max_new_tokens=24)["all"]
    del base
    output = options.output_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    config = TrainConfig.from_mapping(
        dict(
            model=options.model,
            dtype=options.dtype,
            device=options.device,
            data=f"task:{options.task}",
            output_dir=output,
            max_steps=options.steps,
            r=16,
            lora_alpha=32,
            lr=2e-3,
            batch_size=8,
            warmup_steps=3,
            train_examples=8 * options.steps,
            eval_every=0,
            save_every=0,
            log_every=5,
        )
    )
    result = train(config)
    after = exact_match(result.model, result.tokenizer, test, max_new_tokens=24)["all"]
    print(f"\n{'prompt':<62} {'base model':<26} {'with adapter':<26}")
    for old, new in list(zip(before["predictions"], after["predictions"], strict=True))[:8]:
        print(f"{old['prompt'][:60]:<62} {old['answer'][:24]:<26} {new['answer'][:24]:<26}")
    print(
        f"\nexact match on {len(test)} test prompts: base {before['accuracy']:.0%}, "
        f"adapter {after['accuracy']:.0%} ({options.steps} steps, {result.seconds:.0f}s)\n"
        f"adapter (PEFT format): {output}\n"
        f'try: rankwise generate --adapter {output} "{test[0]["prompt"]}"'
    )

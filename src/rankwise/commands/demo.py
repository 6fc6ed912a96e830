"""``rankwise demo``: the README's first command: train a small adapter on a built-in task and
show the base model's and the adapter's answers and exact match side by side."""

from __future__ import annotations

import argparse
import time

from rankwise.data import TASKS, get_task
from rankwise.evaluate.accuracy import exact_match
from rankwise.models import load_model
from rankwise.train import from_mapping, train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train a small adapter on a built-in task")
    parser.add_argument("--task", default="reverse_words", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (batch 8)")
    parser.add_argument("--examples", type=int, default=24, help="test prompts to score")
    parser.add_argument("--output-dir", default=None, help="default: runs/demo-<time>")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    test = get_task(args.task).test_set(args.examples)
    base = load_model(dtype="bfloat16")
    print(f"{base.name}: scoring the base model on {len(test)} '{args.task}' test prompts...")
    before = exact_match(base.model, base.tokenizer, test, max_new_tokens=24)["all"]
    del base
    output = args.output_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    config = from_mapping(
        dict(
            data=f"task:{args.task}",
            output_dir=output,
            max_steps=args.steps,
            r=16,
            lora_alpha=32,
            lr=2e-3,
            batch_size=8,
            warmup_steps=3,
            dtype="bfloat16",
            train_examples=8 * args.steps,
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
        f"adapter {after['accuracy']:.0%} ({args.steps} steps, {result.seconds:.0f}s)\n"
        f"adapter (PEFT format): {output}\n"
        f'try: rankwise generate --adapter {output} "{test[0]["prompt"]}"'
    )

"""Adapter variants and initialisations on the embedded model: the same run, one change each.

    python bench/inits.py [--task reverse_words] [--steps 200] [--lrs 1e-4,3e-4,1e-3] [--quick]

Each variant trains a rank-16 all-linear adapter on one built-in task with the same data,
batches and steps (fp32, so no variant pays for emulated bf16) at every learning rate of the
sweep; the rate with the lowest validation loss is kept (weight-aware inits start on W's
principal directions and usually want a smaller one), and its exact match on the test split,
trainable parameters and training tokens/s are reported.
Data-driven inits (CorDA, EVA) calibrate on the task's own training data. ``--quick`` runs a
few steps on a few prompts to check that the script works (its table is not written).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.adapters.inject import count_parameters  # noqa: E402
from rankwise.data import get_task  # noqa: E402
from rankwise.evaluate.accuracy import exact_match  # noqa: E402
from rankwise.models import DEFAULT_MODEL  # noqa: E402
from rankwise.train import TrainConfig, train  # noqa: E402

VARIANTS = {
    "LoRA (init_a)": {},
    "PiSSA": {"init": "pissa"},
    "PiSSA, 4 subspace iterations": {"init": "pissa_niter_4"},
    "OLoRA": {"init": "olora"},
    "CorDA IPM": {"init": "corda_ipm"},
    "EVA": {"init": "eva"},
    "KaSA": {"init": "kasa"},
    "DoRA": {"use_dora": True},
    "LoRA+ (λ = 16)": {"loraplus_lr_ratio": 16.0},
}


def run(task: str, steps: int, lr: float, tests: int, settings: dict) -> list[object]:
    """One variant at one learning rate: [lr, val loss, exact match, trainable, tokens/s]."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_mapping(
            dict(
                data=f"task:{task}",
                output_dir=out,
                max_steps=steps,
                r=16,
                lora_alpha=32,
                lr=lr,
                batch_size=8,
                warmup_steps=min(10, steps // 5),
                dtype="float32",
                eval_every=steps,
                save_every=0,
                calib_samples=16,
                seq_len=128,
                **settings,
            )
        )
        result = train(config)
    test = get_task(task).test_set(tests)
    accuracy = exact_match(result.model, result.tokenizer, test)["all"]["accuracy"]
    trainable, _ = count_parameters(result.model)
    return [
        lr,
        result.val_loss if result.val_loss is not None else float("inf"),
        f"{accuracy:.1%}",
        f"{trainable:,}",
        f"{result.tokens_per_second:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="reverse_words")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="the learning-rate sweep")
    parser.add_argument("--test-examples", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a few steps, to check the script")
    args = parser.parse_args()
    steps, tests = (3, 2) if args.quick else (args.steps, args.test_examples)
    lrs = [float(x) for x in args.lrs.split(",")][: 1 if args.quick else None]
    rows = []
    for name, settings in VARIANTS.items():
        runs = [run(args.task, steps, lr, tests, settings) for lr in lrs]
        best = min(runs, key=lambda r: r[1])
        rows.append([name, best[0], f"{best[1]:.4f}", *best[2:]])
        print(rows[-1], flush=True)
    if args.quick:
        return
    headers = [
        "variant",
        "chosen lr",
        "val loss",
        "test exact match",
        "trainable",
        "train tokens/s",
    ]
    write_section(
        "inits",
        f"## Adapter variants and initialisations (`bench/inits.py`)\n\nMachine: {machine()}. "
        f"Model: {DEFAULT_MODEL}, fp32, r=16 α=32 on all linear layers, task {args.task}, "
        f"{steps} steps, batch 8, learning rates {args.lrs} (the best on validation kept), "
        f"{tests} test prompts, greedy decoding. "
        f"Reproduce: `python bench/inits.py --task {args.task} --steps {steps} --lrs {args.lrs}`."
        f"\n\n{markdown_table(headers, rows)}",
    )


if __name__ == "__main__":
    main()

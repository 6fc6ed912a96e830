"""Adapter variants and initialisations on the embedded model: the same run, one change each.

    python bench/inits.py [--tasks reverse_words,add_numbers] [--steps 300] [--at 50,100,300]
                          [--lrs 1e-4,3e-4,1e-3] [--seeds 0,1,2] [--only A,B]
                          [--section inits] [--quick]

Each variant trains a rank-16 all-linear adapter on each task with the same data, batches and
steps (fp32, so no variant pays for emulated bf16) at every learning rate of the sweep; the rate
with the lowest final validation loss is kept (weight-aware inits start on W's principal
directions and usually want a smaller one), and its exact match on the test split after each
step count of ``--at`` (checkpoints of the one run), trainable parameters and training tokens/s
are reported. PEFT's own LoRA, DoRA, PiSSA and OLoRA train under the same loop in the same run
(``common.train_peft``); PEFT's EVA and CorDA need their own preprocessing passes and are
compared with rankwise's numerically in tests/test_eva.py and tests/test_adapter_variants.py.
Data-driven inits (CorDA, EVA) calibrate on the task's own training data. ``--quick`` runs a
few steps on a few prompts to check that the script works (its table is not written).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, train_peft, write_section  # noqa: E402

from rankwise.adapters.inject import count_parameters  # noqa: E402
from rankwise.data import get_task  # noqa: E402
from rankwise.evaluate.accuracy import exact_match  # noqa: E402
from rankwise.models import DEFAULT_MODEL, load_model  # noqa: E402
from rankwise.train import TrainConfig, train  # noqa: E402
from rankwise.train.checkpoint import list_checkpoints  # noqa: E402

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
    "LoLDU": {"init": "loldu"},
    "NOLA": {"init": "nola"},
}
# PEFT's implementations of the same variants (LoraConfig keys), trained by common.train_peft
PEFT_VARIANTS = {
    "PEFT LoRA": {},
    "PEFT PiSSA": {"init_lora_weights": "pissa"},
    "PEFT OLoRA": {"init_lora_weights": "olora"},
    "PEFT DoRA": {"use_dora": True},
}


def settings(task: str, steps: int, lr: float, out: str, at: list[int], seed: int) -> dict:
    """The training keys every variant shares; checkpoints at the step counts of ``at``."""
    return dict(
        seed=seed,
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
        save_every=min(at),
        keep_last=steps // min(at) + 1,
        calib_samples=16,
        seq_len=128,
    )


def accuracy(model, tokenizer, test: list[dict]) -> float:
    return exact_match(model, tokenizer, test)["all"]["accuracy"]


def run(
    task: str, steps: int, lr: float, at: list[int], test: list[dict], variant: dict, seed: int
) -> dict:
    """One rankwise variant at one learning rate: val loss, exact match at ``at``, size, speed."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_mapping({**settings(task, steps, lr, out, at, seed), **variant})
        result = train(config)
        matches = {}
        for folder in list_checkpoints(Path(out)):
            done = int(folder.name.split("-")[1])
            if done in at:
                result.trained.load(folder)
                matches[done] = accuracy(result.model, result.tokenizer, test)
    return {
        "lr": lr,
        "val": result.val_loss if result.val_loss is not None else float("inf"),
        "matches": matches,
        "trainable": count_parameters(result.model)[0],
        "tokens_per_s": result.tokens_per_second,
    }


def run_peft(
    task: str, steps: int, lr: float, at: list[int], test: list[dict], variant: dict, seed: int
) -> dict:
    """PEFT's variant at one learning rate, under rankwise's loop, measured the same way."""
    from peft import LoraConfig

    from rankwise.train.distributed import World
    from rankwise.train.examples import build_examples
    from rankwise.train.loss import validation_loss

    loaded = load_model(dtype="float32")
    config = TrainConfig.from_mapping(settings(task, steps, lr, "unused", at, seed))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", **variant)
    matches = {}

    def score(done: int, model) -> None:
        if done in at:
            matches[done] = accuracy(model, loaded.tokenizer, test)

    inner, speed = train_peft(loaded, config, lora, score)
    val, _ = build_examples(config.data, loaded.tokenizer, config, "validation", World())
    pad = loaded.tokenizer.pad_token_id
    return {
        "lr": lr,
        "val": validation_loss(inner, val[: config.eval_examples], 8, pad, World()),
        "matches": matches,
        "trainable": count_parameters(inner)[0],
        "tokens_per_s": speed,
    }


def over_seeds(trainer, task, steps, lr, at, test, variant, seeds: list[int]) -> dict:
    """``trainer``'s result at every seed: the mean validation loss and exact match, and each
    step count's lowest and highest exact match over the seeds."""
    runs = [trainer(task, steps, lr, at, test, variant, seed) for seed in seeds]
    steps_scored = runs[0]["matches"]
    return {
        "lr": lr,
        "val": statistics.mean(r["val"] for r in runs),
        "matches": {n: statistics.mean(r["matches"][n] for r in runs) for n in steps_scored},
        "lowest": {n: min(r["matches"][n] for r in runs) for n in steps_scored},
        "highest": {n: max(r["matches"][n] for r in runs) for n in steps_scored},
        "trainable": runs[0]["trainable"],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="reverse_words,add_numbers")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--at", default="50,100,300", help="step counts scored on test")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="the learning-rate sweep")
    parser.add_argument("--test-examples", type=int, default=50)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--seeds", default="0", help="seeds each run repeats with (mean shown)")
    parser.add_argument("--section", default="inits", help="docs/benchmarks.md section to write")
    parser.add_argument("--quick", action="store_true", help="a few steps, to check the script")
    args = parser.parse_args()
    steps, tests = (4, 2) if args.quick else (args.steps, args.test_examples)
    at = [2, 4] if args.quick else [int(x) for x in args.at.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")][: 1 if args.quick else None]
    tasks = args.tasks.split(",")[: 1 if args.quick else None]
    seeds = [int(x) for x in args.seeds.split(",")]
    every = {name: (run, v) for name, v in VARIANTS.items()}
    every |= {name: (run_peft, v) for name, v in PEFT_VARIANTS.items()}
    chosen = args.only.split(",") if args.only else list(every)
    rows = []
    for name in chosen:
        trainer, variant = every[name]
        best = []
        for task in tasks:
            test = get_task(task).test_set(tests)
            runs = [over_seeds(trainer, task, steps, lr, at, test, variant, seeds) for lr in lrs]
            best.append(min(runs, key=lambda r: r["val"]))
        scores = [statistics.mean(b["matches"].get(n, float("nan")) for b in best) for n in at]
        lows = [statistics.mean(b["lowest"].get(n, float("nan")) for b in best) for n in at]
        highs = [statistics.mean(b["highest"].get(n, float("nan")) for b in best) for n in at]
        rows.append(
            [
                name,
                " / ".join(f"{b['lr']:g}" for b in best),
                *(
                    f"{m:.1%}" + (f" ({lo:.0%}–{hi:.0%})" if len(seeds) > 1 else "")
                    for m, lo, hi in zip(scores, lows, highs, strict=True)
                ),
                f"{best[0]['trainable']:,}",
                f"{statistics.mean(b['tokens_per_s'] for b in best):.0f}",
            ]
        )
        print(rows[-1], flush=True)
    if args.quick:
        return
    headers = [
        "variant",
        "chosen lr per task",
        *(f"mean EM @{n}" for n in at),
        "trainable",
        "train tokens/s",
    ]
    seeds_note = (
        f" Each run repeats with seeds {args.seeds}: the mean, and in brackets the lowest and "
        "highest seed."
        if len(seeds) > 1
        else ""
    )
    write_section(
        args.section,
        f"## Adapter variants and initialisations (`bench/inits.py`, {args.tasks})\n\n"
        f"Machine: {machine()}. "
        f"Model: {DEFAULT_MODEL}, fp32, r=16 α=32 on all linear layers, tasks {args.tasks}, "
        f"{steps} steps, batch 8, learning rates {args.lrs} (the best final validation loss kept "
        f"per task), exact match (mean over the tasks) on {tests} test prompts after "
        f"{args.at} steps of the same run, greedy decoding. PEFT rows train PEFT's own "
        f"implementation under the same loop.{seeds_note} Reproduce: `python bench/inits.py "
        f"--tasks {args.tasks} --steps {steps} --at {args.at} --lrs {args.lrs} --seeds "
        f"{args.seeds} --only '{args.only}' --section {args.section}`."
        f"\n\n{markdown_table(headers, rows)}",
    )


if __name__ == "__main__":
    main()

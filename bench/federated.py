"""Federated LoRA on the embedded model: every method beside centralised training on the union.

    python bench/federated.py [--rounds 10] [--steps 20] [--examples 200] [--eval 16]
        [--settings task dirichlet:0.5] [--methods fedit fedsb ...]
    python bench/federated.py --quick   # 2 rounds of 1 step on a few examples: a smoke run

Six clients, each holding one built-in task (``partition: task``, non-IID by task) and, as a
second setting, a Dirichlet(0.5) mix of the tasks; every method runs ``--rounds`` rounds of
``--steps`` local steps per client (equal client steps per round). Rounds run in one process
(``rankwise.fed.sequential``: the functions the Flower app calls, the clients in turn), so
seconds per round are the six clients' training plus the server's aggregation and evaluation on
this machine, and bytes are the payloads as Flower's ``ArrayRecord.count_bytes()`` counts them.
Per method: the global mean exact match over the six tasks after every round, total bytes (up and
down), seconds per round and the largest aggregation error. The reference is one adapter trained
centrally on the union of the clients' data for the same total steps (clients × rounds × steps).
hello uses its Fisher pattern with budgets of a third, half and all of the blocks; legend
capabilities 0.25, 0.5 and 1 (cycled over the clients). Writes docs/benchmarks.md, section
"federated" (not with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.adapters import remove_experts  # noqa: E402
from rankwise.data import load_dataset_spec  # noqa: E402
from rankwise.evaluate.accuracy import exact_match  # noqa: E402
from rankwise.fed import METHODS  # noqa: E402
from rankwise.fed.config import FedConfig  # noqa: E402
from rankwise.fed.partition import write_partitions  # noqa: E402
from rankwise.fed.sequential import run_rounds  # noqa: E402
from rankwise.fed.server import FedServer  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.train import TrainConfig, train  # noqa: E402

CLIENTS = 6  # one per built-in task
ALLOCATION = {  # the allocating methods' per-client settings (SmolLM2-135M: 30 blocks)
    "hello": {"hello_budget": [10, 15, 30], "hello_pattern": "fisher"},
    "legend": {"capabilities": [0.25, 0.5, 1.0]},
}


def training(args: argparse.Namespace, folder: Path) -> dict:
    """The training keys every run shares (federated clients and the centralised reference)."""
    return {
        "data": "task:all",
        "train_examples": args.examples,
        "eval_examples": args.eval,  # the validation loss's examples per task
        "r": 8,
        "lora_alpha": 16.0,
        "target_modules": "all-linear",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": 2e-3,
        "warmup_steps": 0,
        "dtype": "float32",
        "log_every": 10**6,
        "output_dir": str(folder),
    }


def task_mean(per_task: dict[str, float]) -> float:
    return statistics.fmean(per_task.values())


def federated(loaded, args, method: str, partition: str, datas: list[str], folder: Path) -> dict:
    """One method's run: its metrics lines, condensed."""
    settings = training(args, folder / f"{partition.replace(':', '-')}-{method}") | {
        "method": method,
        "partition": partition,
        "clients": CLIENTS,
        "rounds": args.rounds,
        "max_steps": args.steps,
        "eval_records": args.eval,
        **ALLOCATION.get(method, {}),
    }
    lines = run_rounds(FedServer(FedConfig.from_mapping(settings), loaded), datas, args.rounds)
    curve = [task_mean(line["exact_match_per_task"]) for line in lines]
    return {
        "curve": curve,
        "final": curve[-1],
        "best": max(curve),
        "bytes": sum(line["uplink_bytes"] + line["downlink_bytes"] for line in lines),
        "seconds": statistics.fmean(line["round_seconds"] for line in lines),
        "error": max(line["aggregation_error"] for line in lines),
    }


def centralised(loaded, args, folder: Path) -> float:
    """Mean exact match of one adapter trained on the union for the same total steps."""
    steps = CLIENTS * args.rounds * args.steps
    config = TrainConfig.from_mapping(training(args, folder / "central") | {"max_steps": steps})
    result = train(config, loaded=loaded)
    try:
        records = load_dataset_spec("task:all", split="validation", n=args.eval).records
        tallies = exact_match(result.model, loaded.tokenizer, records, args.batch_size)
    finally:
        remove_experts(loaded.model)
    return task_mean({task: t["accuracy"] for task, t in tallies.items()})


def table(results: dict[str, dict], reference: float) -> str:
    headers = [
        "method",
        "exact",
        "mean EM per round",
        "final EM",
        "% of centralised",
        "total MB",
        "s / round",
        "max aggregation error",
    ]
    rows = [
        [
            method,
            "yes" if METHODS[method].exact else "no",
            " ".join(f"{x:.2f}" for x in r["curve"]),
            f"{r['final']:.3f}",
            f"{100 * r['final'] / reference:.0f}%" if reference else "n/a",
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['seconds']:.1f}",
            f"{r['error']:.1e}",
        ]
        for method, r in results.items()
    ]
    return markdown_table(headers, rows)


def targets(results: dict[str, dict], reference: float) -> str:
    """The issue's three targets, read off this setting's numbers."""
    exact = [m for m in results if METHODS[m].exact]
    lines = [f"exact methods' largest error {max(results[m]['error'] for m in exact):.1e} (< 1e-6)"]
    best = max(results, key=lambda m: results[m]["final"])
    if reference:
        share = results[best]["final"] / reference
        lines.append(f"best federated ({best}) at {100 * share:.0f}% of centralised (≥ 90%)")
    if {"fedsb", "fedit"} <= set(results):
        fewer = results["fedit"]["bytes"] / results["fedsb"]["bytes"]
        kept = results["fedsb"]["final"] / max(results["fedit"]["final"], 1e-9)
        lines.append(
            f"Fed-SB sends {fewer:.0f}× fewer bytes than FedIT for {100 * kept:.0f}% of its "
            "accuracy (≥ 10× for ≥ 95%)"
        )
    return "; ".join(lines) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="local steps per client and round")
    parser.add_argument("--examples", type=int, default=200, help="training examples per task")
    parser.add_argument("--eval", type=int, default=16, help="validation prompts per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--settings", nargs="+", default=["task", "dirichlet:0.5"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.examples, args.eval = 2, 1, 4, 1
        args.batch_size, args.seq_len, args.settings = 2, 64, ["task"]
    loaded = load_model(dtype="float32")
    folder = Path(tempfile.mkdtemp(prefix="rankwise-fed-bench-"))
    reference = centralised(loaded, args, folder)
    print(f"centralised: mean exact match {reference:.3f}", flush=True)
    sections = []
    for partition in args.settings:
        datas = write_partitions(
            "task:all", partition, CLIENTS, folder / "partitions" / partition, args.examples, 0
        )
        results = {}
        for method in args.methods:
            results[method] = federated(loaded, args, method, partition, datas, folder)
            print(f"{partition} {method}: {results[method]}", flush=True)
        sections.append(
            f"**{partition}** (centralised reference: mean exact match {reference:.3f}). "
            f"{targets(results, reference)}\n\n{table(results, reference)}"
        )
    body = (
        "## Federated LoRA (`bench/federated.py`)\n\n"
        f"Machine: {machine()}. Model: {loaded.name}, fp32. {CLIENTS} clients, {args.rounds} "
        f"rounds of {args.steps} local steps (batch {args.batch_size}), rank 8 on every linear "
        f"layer, {args.examples} training examples per task, exact match on {args.eval} "
        "validation prompts per task (mean over the six tasks); the centralised reference trains "
        f"{CLIENTS * args.rounds * args.steps} steps on the union. Rounds run in one process "
        "(`rankwise.fed.sequential`), so seconds are all six clients' training plus the server's "
        "work; bytes are Flower's `count_bytes()` of every payload, up and down.\n\n"
        + "\n\n".join(sections)
    )
    print(body)
    if not args.quick:
        write_section("federated", body)


if __name__ == "__main__":
    main()

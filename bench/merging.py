"""Merging per-task adapters: exact match and retained score of each method, PEFT alongside.

    python bench/merging.py --adapters DIR [--ranks 4 8 16] [--n 50] [--weights 1.0 0.5]

DIR holds one PEFT adapter folder per built-in task, named after the task (rankwise.data.tasks).
All adapters are merged into one with every rankwise method at each rank k, and with PEFT's
``add_weighted_adapter`` (svd at each k; ties and dare_ties, which PEFT merges factor by factor at
the adapters' own rank) in the same run. Each merged adapter is scored by greedy exact match on
every task's test set; "retained" is that score over the task's own adapter's score. Writes the
table into docs/benchmarks.md (section "merging").
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.adapters import (  # noqa: E402
    LoraWeights,
    attach_adapters,
    merge_experts,
    read_adapter,
    remove_experts,
)
from rankwise.data.tasks import TASKS  # noqa: E402
from rankwise.errors import RankwiseError  # noqa: E402
from rankwise.evaluate.accuracy import exact_match  # noqa: E402
from rankwise.merge import METHODS, merge_adapters  # noqa: E402
from rankwise.merge.dare import DEFAULT_DENSITY as DARE_DENSITY  # noqa: E402
from rankwise.merge.ties import DEFAULT_DENSITY as TIES_DENSITY  # noqa: E402
from rankwise.models import load_model  # noqa: E402

Scores = dict[str, float]  # task -> exact match


def task_adapters(folder: Path) -> dict[str, Path]:
    """The adapter folder of each task in ``folder``; a folder named after no task is an error."""
    found = {p.name: p for p in sorted(folder.iterdir()) if (p / "adapter_config.json").is_file()}
    unknown = sorted(set(found) - set(TASKS))
    if unknown or len(found) < 2:
        raise RankwiseError(
            f"'{folder}' must hold at least two adapter folders named after tasks "
            f"({', '.join(TASKS)}); found {', '.join(found) or 'none'}"
        )
    return found


def accuracy_by_task(model, tokenizer, records: list[dict], max_new_tokens: int) -> Scores:
    """Greedy exact match of the model on each task of the (task-tagged) records."""
    tallies = exact_match(model, tokenizer, records, batch_size=32, max_new_tokens=max_new_tokens)
    return {task: tally["accuracy"] for task, tally in tallies.items()}


def with_adapter(model, weights: LoraWeights, evaluate: Callable[[], Scores]) -> Scores:
    """Evaluate with ``weights`` attached and folded into the base weights, then detach them."""
    attach_adapters(model, [weights])
    merge_experts(model)
    try:
        return evaluate()
    finally:
        remove_experts(model)


def row(
    label: str, weight: object, k: object, scores: Scores, own: Scores, extra: list[object]
) -> list[object]:
    """A table row: per task 'EM (retained)', the means, then the extra columns."""
    cells, kept = [], []
    for name, value in scores.items():
        retained = value / own[name] if own[name] > 0 else None
        kept += [retained] if retained is not None else []
        suffix = f" ({100 * retained:.0f})" if retained is not None else ""
        cells.append(f"{100 * value:.0f}{suffix}")
    mean = 100 * sum(scores.values()) / len(scores)
    mean_kept = f"{100 * sum(kept) / len(kept):.0f}" if kept else "n/a"
    return [label, weight, k, *cells, f"{mean:.1f}", mean_kept, *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, required=True, help="one adapter folder per task")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--peft", nargs="+", default=["svd", "ties", "dare_ties"])
    parser.add_argument("--n", type=int, default=50, help="test items per task")
    parser.add_argument(
        "--weights", type=float, nargs="+", default=[1.0], help="weight of every adapter (a sweep)"
    )
    parser.add_argument("--seed", type=int, default=0, help="test sets, DARE and k-means")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    args = parser.parse_args()

    start = time.perf_counter()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    folders = task_adapters(args.adapters)
    adapters = {name: read_adapter(path) for name, path in folders.items()}
    tests = {
        name: [{**r, "task": name} for r in TASKS[name].test_set(args.n, args.seed)]
        for name in folders
    }
    every = [record for name in folders for record in tests[name]]

    def evaluate(on: PeftModel | torch.nn.Module = model) -> Callable[[], Scores]:
        return lambda: accuracy_by_task(on, tokenizer, every, args.max_new_tokens)

    base = evaluate()()
    own = {
        name: with_adapter(
            model,
            adapters[name],
            lambda n=name: accuracy_by_task(model, tokenizer, tests[n], args.max_new_tokens),
        )[name]
        for name in folders
    }
    print(f"base {base}\nown {own}", file=sys.stderr)
    rows = [
        row("base model", "", "", base, own, ["", ""]),
        row("own adapter", "", "", own, own, ["", ""]),
    ]
    densities = {"ties": TIES_DENSITY, "dare_linear": DARE_DENSITY, "dare_ties": DARE_DENSITY}
    for weight, method, k in itertools.product(args.weights, args.methods, args.ranks):
        weights = [weight] * len(adapters)
        tic = time.perf_counter()
        merged, report = merge_adapters(
            list(adapters.values()),
            method,
            weights,
            rank=k,
            seed=args.seed,
            density=densities.get(method),
            names=list(folders),
        )
        seconds = time.perf_counter() - tic
        scores = with_adapter(model, merged, evaluate())
        print(f"{method} w={weight} k={k}: {scores}", file=sys.stderr)
        extra = [f"{100 * report.discarded:.1f}", f"{seconds:.2f}"]
        rows.append(row(f"rankwise {method}", weight, k, scores, own, extra))
    rows += peft_rows(args, copy.deepcopy(model), folders, densities, evaluate, own)

    tasks = list(folders)
    headers = [
        "merge",
        "weight",
        "k",
        *tasks,
        "mean EM %",
        "mean retained %",
        "discarded %",
        "merge s",
    ]
    ranks = sorted({a.rank(m) for a in adapters.values() for m in a.factors})
    body = (
        "## Merging per-task adapters (`bench/merging.py`)\n\n"
        f"Machine: {machine()}. Model: {loaded.name}, fp32. Adapters: {len(adapters)} per-task "
        f"LoRA adapters of rank {'/'.join(map(str, ranks))} from `{args.adapters}`, all merged "
        "into one, every adapter with the same weight (column weight); density "
        f"{TIES_DENSITY} for ties, {DARE_DENSITY} for dare_*; seed {args.seed}. Score: greedy "
        f"exact match on {args.n} test items per task, as 'EM % (retained %)', retained = EM "
        "of the merged adapter over EM of the task's own adapter. PEFT rows are "
        "`add_weighted_adapter` on the same adapters in the same run (ties and dare_ties merge "
        "A and B separately at the adapters' rank). "
        f"Total time {time.perf_counter() - start:.0f} s.\n\n"
        f"Command: `python bench/merging.py {shlex.join(sys.argv[1:])}`\n\n"
        + markdown_table(headers, rows)
    )
    write_section("merging", body)
    print(body)


def peft_rows(args, model, folders, densities, evaluate, own) -> list[list[object]]:
    """PEFT's add_weighted_adapter on the same adapters: svd at each rank, the others once,
    at every weight of the sweep."""
    names = list(folders)
    peft_model = PeftModel.from_pretrained(model, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(folders[name], adapter_name=name)
    peft_model.eval()
    rows = []
    for weight, kind in itertools.product(args.weights, args.peft):
        weights = [weight] * len(names)
        for k in args.ranks if kind.endswith("svd") else [None]:
            density = densities.get(kind.removesuffix("_svd"))
            tic = time.perf_counter()
            try:
                peft_model.add_weighted_adapter(
                    names, weights, "merged", kind, svd_rank=k, density=density
                )
            except ValueError as err:  # e.g. ties and dare_ties need equal ranks
                print(f"PEFT {kind}: {err}", file=sys.stderr)
                continue
            seconds = time.perf_counter() - tic
            peft_model.set_adapter("merged")
            scores = evaluate(peft_model)()
            print(f"PEFT {kind} w={weight} k={k}: {scores}", file=sys.stderr)
            extra = ["", f"{seconds:.2f}"]
            rows.append(row(f"PEFT {kind}", weight, k or "r", scores, own, extra))
            peft_model.set_adapter(names[0])
            peft_model.delete_adapter("merged")
    return rows


if __name__ == "__main__":
    main()

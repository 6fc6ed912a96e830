"""Merging per-task adapters: normalized accuracy of every method, each method's one global
hyperparameter chosen by line search on validation and scored once on test, PEFT alongside.

    python bench/merging.py --adapters DIR [--subsets pairs triples all] [--n 50] [--val 20]
        [--multitask DIR] [--calib-samples 64] [--methods linear tsv ...] [--section merging]
    python bench/merging.py --quick   # two tasks, tiny adapters trained here: a smoke run

DIR holds one PEFT adapter folder per built-in task, named after the task (rankwise.data.tasks);
adapters trained mergeable (``rankwise train --lori-seed``) are benchmarked the same way. For each
subset of tasks (all pairs, a few triples, all of them) every method merges the subset's adapters;
its hyperparameter (λ, the adapters' common weight, for the data-free methods; RegMean's α) takes
the value whose merge keeps the most of the adapters' own validation exact match, and that merge
is scored once on test. "Normalized" is a task's exact match under the merge over its own
adapter's; per subset the table gives its mean and its worst task. PEFT's ``add_weighted_adapter``
(svd, ties_svd, dare_ties_svd, cat) is searched the same way; learned coefficients (``--learn``,
on the tasks' training examples) have no grid. References: each task's own adapter (its exact
match heads the table) and (``--multitask``) one LoRA trained on all tasks together (a row).
Writes docs/benchmarks.md, section ``--section`` (default "merging"; not with --quick), so a
reduced run (pairs with fewer methods) stands beside the full table instead of replacing it.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import tempfile
import time
from pathlib import Path

from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.adapters import (  # noqa: E402
    LoraWeights,
    attach_adapters,
    merge_experts,
    read_adapter,
    remove_experts,
    write_adapter,
)
from rankwise.data.tasks import TASKS  # noqa: E402
from rankwise.errors import RankwiseError  # noqa: E402
from rankwise.evaluate.accuracy import exact_match  # noqa: E402
from rankwise.merge import METHODS, merge_adapters  # noqa: E402
from rankwise.merge.calibration import task_grams  # noqa: E402
from rankwise.merge.learned import OBJECTIVES, learn_coefficients  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.train import TrainConfig, train  # noqa: E402

Scores = dict[str, float]  # task -> exact match
LAMBDAS = [0.25, 0.5, 0.75, 1.0, 1.5]
ALPHAS = [0.5, 0.9, 1.0]
PEFT_KINDS = ["svd", "ties_svd", "dare_ties_svd", "cat"]
QUICK_TASKS = ["reverse_words", "pick_word"]


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


def subsets(tasks: list[str], kinds: list[str], triples: int) -> dict[str, list[tuple[str, ...]]]:
    """The task subsets of each kind: every pair, ``triples`` spread-out triples, all tasks."""
    out: dict[str, list[tuple[str, ...]]] = {}
    if "pairs" in kinds:
        out["pairs"] = list(itertools.combinations(tasks, 2))
    if "triples" in kinds and len(tasks) > 3:
        every = list(itertools.combinations(tasks, 3))
        out["triples"] = every[:: max(1, len(every) // triples)][:triples]
    if "all" in kinds and len(tasks) > 2:
        out["all"] = [tuple(tasks)]
    return out


class Scorer:
    """Greedy exact match of the model with one adapter folded in, on a split's items."""

    def __init__(self, model, tokenizer, items: dict[str, dict[str, list[dict]]], new_tokens):
        self.model, self.tokenizer, self.items, self.new_tokens = (
            model,
            tokenizer,
            items,
            new_tokens,
        )

    def __call__(self, weights: LoraWeights | None, tasks, split: str) -> Scores:
        records = [{**r, "task": t} for t in tasks for r in self.items[split][t]]
        if weights is not None:
            attach_adapters(self.model, [weights])
            merge_experts(self.model)
        try:
            tallies = exact_match(self.model, self.tokenizer, records, 32, self.new_tokens)
        finally:
            if weights is not None:
                remove_experts(self.model)
        return {t: tallies[t]["accuracy"] for t in tasks}


def normalized(scores: Scores, own: Scores) -> dict[str, float]:
    """Each task's exact match over its own adapter's (tasks their adapter fails are left out)."""
    return {t: scores[t] / own[t] for t in scores if own[t] > 0}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def candidates(args, loaded, adapters, calib, grams_of) -> dict[str, tuple[str, list, object]]:
    """Per method label: (hyperparameter name, grid, merge(adapters, tasks, value))."""
    out = {}
    for method in args.methods:
        if METHODS[method].needs_calibration:

            def regmean(ws, tasks, alpha, method=method):
                grams = [grams_of[t] for t in tasks]
                return merge_adapters(
                    ws, method, rank=sum_rank(ws), grams=grams, settings={"alpha": alpha}
                )

            out[method] = ("α", ALPHAS[:2] if args.quick else ALPHAS, regmean)
        else:

            def free(ws, tasks, lam, method=method):
                return merge_adapters(ws, method, [lam] * len(ws), rank=sum_rank(ws))

            out[method] = ("λ", LAMBDAS[1:4:2] if args.quick else LAMBDAS, free)
    for kind in args.learn:

        def learned(ws, tasks, steps, kind=kind):
            sources = [f"task:{t}" for t in tasks]
            ws = learn_coefficients(loaded, ws, sources, kind=kind, steps=steps, samples=calib)
            return merge_adapters(ws, "linear", rank=sum_rank(ws))

        out[f"learned {kind}"] = ("steps", [args.learn_steps], learned)
    for kind in args.peft:
        out[f"PEFT {kind}"] = (
            "λ",
            LAMBDAS[1:4:2] if args.quick else LAMBDAS,
            lambda ws, tasks, lam, kind=kind: peft_merge(loaded, ws, kind, lam),
        )
    return out


def sum_rank(adapters: list[LoraWeights]) -> int:
    """The largest rank an exact merge of these adapters can need: the sum of their ranks."""
    return sum(max(w.rank(m) for m in w.factors) for w in adapters)


def peft_merge(loaded, adapters: list[LoraWeights], kind: str, lam: float):
    """PEFT's add_weighted_adapter over the same adapters, read back as LoraWeights."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, weights in enumerate(adapters):
            write_adapter(weights, Path(tmp) / str(i))
        model = PeftModel.from_pretrained(loaded.model, Path(tmp) / "0", adapter_name="0")
        names = [str(i) for i in range(len(adapters))]
        for name in names[1:]:
            model.load_adapter(Path(tmp) / name, adapter_name=name)
        extra = {"density": 0.5} if "ties" in kind else {}
        extra |= {"svd_rank": sum_rank(adapters)} if kind.endswith("svd") else {}
        model.add_weighted_adapter(names, [lam] * len(names), "merged", kind, **extra)
        factors, alphas = {}, {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "merged" in module.lora_A:
                key = name.removeprefix("base_model.model.")
                a = module.lora_A["merged"].weight.detach().clone()
                b = module.scaling["merged"] * module.lora_B["merged"].weight.detach().clone()
                factors[key], alphas[key] = (a, b), float(a.shape[0])
        model.unload()  # gives the base model back unchanged
    return LoraWeights(factors, alphas, base_model=adapters[0].base_model), None


def quick_adapters(folder: Path) -> Path:
    """Two tiny task adapters trained here (a smoke run, not a measurement)."""
    for name in QUICK_TASKS:
        train(TrainConfig.from_mapping(dict(
            data=f"task:{name}", output_dir=str(folder / name), max_steps=8, r=4,
            lora_alpha=8, target_modules=["q_proj", "v_proj"], lr=3e-3, batch_size=4,
            warmup_steps=2, eval_every=0, save_every=0, train_examples=32,
        )))  # fmt: skip
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, help="one adapter folder per task")
    parser.add_argument("--multitask", type=Path, help="a LoRA trained on all the tasks at once")
    parser.add_argument("--subsets", nargs="+", default=["pairs", "triples", "all"])
    parser.add_argument("--triples", type=int, default=4, help="how many triples")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--peft", nargs="*", default=PEFT_KINDS)
    parser.add_argument("--learn", nargs="*", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--learn-steps", type=int, default=50, help="learned coefficients' steps")
    parser.add_argument("--n", type=int, default=50, help="test items per task")
    parser.add_argument("--val", type=int, default=20, help="validation items per task")
    parser.add_argument("--calib-samples", type=int, default=64, help="RegMean prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--section", default="merging", help="docs/benchmarks.md section")
    parser.add_argument("--quick", action="store_true", help="two tiny tasks: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.n = args.val = 4
        args.methods, args.peft = ["linear", "tsv", "iso_c", "knots_ties", "regmean"], ["svd"]
        args.learn, args.learn_steps = ["entropy"], 2
        args.calib_samples, args.max_new_tokens, args.subsets = 8, 12, ["pairs"]
        args.adapters = quick_adapters(Path(tempfile.mkdtemp(prefix="rankwise-merge-bench-")))
    if args.adapters is None:
        parser.error("give --adapters DIR (or --quick)")

    start = time.perf_counter()
    loaded = load_model(args.model)
    folders = task_adapters(args.adapters)
    adapters = {name: read_adapter(path) for name, path in folders.items()}
    tasks = list(folders)
    items = {
        "test": {t: TASKS[t].test_set(args.n, args.seed) for t in tasks},
        "validation": {t: TASKS[t].records("validation", args.val, args.seed) for t in tasks},
    }
    score = Scorer(loaded.model, loaded.tokenizer, items, args.max_new_tokens)
    own = {split: {t: score(adapters[t], [t], split)[t] for t in tasks} for split in items}
    print(f"own {own}", file=sys.stderr)
    tic = time.perf_counter()  # RegMean's inputs: each task's, once (they do not depend on α)
    needed = any(METHODS[m].needs_calibration for m in args.methods)
    grams_of = {
        task: task_grams(loaded, [w], [f"task:{task}"], samples=args.calib_samples)[0]
        for task, w in adapters.items()
        if needed
    }
    gram_seconds = (time.perf_counter() - tic) / len(adapters)
    methods = candidates(args, loaded, adapters, args.calib_samples, grams_of)
    multitask = read_adapter(args.multitask) if args.multitask else None
    rows = []
    for kind, groups in subsets(tasks, args.subsets, args.triples).items():
        for label, (hp, grid, merge) in methods.items():
            means, worst, chosen, seconds, ranks = [], [], [], [], []
            for group in groups:
                ws = [adapters[t] for t in group]
                best = None
                for value in grid:  # line search on validation (nothing to choose: none)
                    tic = time.perf_counter()
                    merged = merge(ws, group, value)[0]
                    elapsed = time.perf_counter() - tic
                    kept = 0.0
                    if len(grid) > 1:
                        on_val = score(merged, group, "validation")
                        kept = mean(normalized(on_val, own["validation"]).values())
                    if best is None or kept > best[0]:
                        best = (kept, value, merged, elapsed)
                _, value, merged, elapsed = best
                seconds.append(elapsed)
                ranks.append(max(merged.rank(m) for m in merged.factors))
                test = normalized(score(merged, group, "test"), own["test"])
                print(f"{kind} {group} {label} {hp}={value}: {test}", file=sys.stderr)
                means.append(mean(test.values()))
                worst.append(min(test.values(), default=0.0))
                chosen.append(value)
            rows.append([kind, label, f"{hp} {'/'.join(map(str, sorted(set(chosen))))}",
                         f"{100 * mean(means):.0f}", f"{100 * min(worst):.0f}",
                         max(ranks), f"{mean(seconds):.2f}"])  # fmt: skip
        if multitask is not None:
            kept = [normalized(score(multitask, g, "test"), own["test"]) for g in groups]
            rows.append([kind, "multitask LoRA (reference)", "",
                         f"{100 * mean(mean(k.values()) for k in kept):.0f}",
                         f"{100 * min(min(k.values()) for k in kept):.0f}", "", ""])  # fmt: skip
    headers = ["subsets", "merge", "chosen on validation", "mean normalized %",
               "worst task %", "output rank", "merge s"]  # fmt: skip
    ranks = sorted({a.rank(m) for a in adapters.values() for m in a.factors})
    body = (
        f"## Merging per-task adapters (`bench/merging.py`, {'/'.join(args.subsets)})\n\n"
        f"Machine: {machine()}. Model: {loaded.name}, fp32. Adapters: {len(adapters)} per-task "
        f"LoRA adapters of rank {'/'.join(map(str, ranks))} from `{args.adapters}`. Own exact "
        f"match on test: {', '.join(f'{t} {100 * v:.0f}%' for t, v in own['test'].items())}. "
        f"Normalized = merged EM / own EM on {args.n} test items per task, after choosing each "
        f"method's hyperparameter on {args.val} validation items per task (per subset); mean "
        "and worst over the subsets' tasks. RegMean reads "
        f"{args.calib_samples} unlabeled training prompts per task; their statistics are "
        f"computed once per task ({gram_seconds:.0f} s each), not in merge s. PEFT rows are "
        "`add_weighted_adapter` on the same adapters in the same run. Total time "
        f"{time.perf_counter() - start:.0f} s.\n\n"
        f"Command: `python bench/merging.py {shlex.join(sys.argv[1:])}`\n\n"
        + markdown_table(headers, rows)
    )
    if not args.quick:
        write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()

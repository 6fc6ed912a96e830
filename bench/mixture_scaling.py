"""RadarGate's claim on the built-in tasks: with more experts a weighted-sum gate stalls while
rotations keep improving (arXiv 2505.23184). The scaling sweep of ``bench/mixtures.py``.

    python bench/mixture_scaling.py [--experts 2 4 8 16] [--steps 600] [--lrs 3e-4 1e-3 3e-3]
    python bench/mixture_scaling.py --quick      # a few steps, E = 2, one learning rate
    python bench/mixture_scaling.py --gradient-checkpointing   # the full sweep, less memory

For each E, on every linear layer of SmolLM2-135M (bf16 base, fp32 adapters): (a) the dense
softmax gate over E experts of rank ``--expert-rank`` (router ``softmax``), (b) RadarGate over
the same experts, (c) a single LoRA whose rank gives it RadarGate's trainable parameters; and
once FlyLoRA with its official settings (github.com/gfyddha/FlyLoRA, scripts/run_mmlu.sh: rank
32, alpha 64, top-8, bias step 1e-3). Every one trains on the six built-in tasks mixed at each
learning rate of the same sweep; the rate with the best validation exact match is kept and
scored on test items of the same tasks ("fitting") and on a held-out family of longer inputs
for the same skills, never seen in training ("generalisation": 7-8 words to reverse, 6
numbers to sort, 4-digit sums, 5-digit numbers to spell, 8-word lists, 6-7 letters to shift).
Reports trainable parameters, training tokens/s, greedy decoding tokens/s (interleaved rounds
per E, relative to that E's single LoRA) and RadarGate's contrast (``rankwise mix inspect``).
Writes docs/benchmarks.md, section "mixture-scaling" (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402
from mixtures import decode_speeds  # noqa: E402

from rankwise.adapters import LoraConfig, inject_adapter  # noqa: E402
from rankwise.data.tasks import LONGER, TASKS, mixed  # noqa: E402
from rankwise.evaluate.accuracy import exact_match  # noqa: E402
from rankwise.mixture import MixConfig, build_mixture, train_mixture  # noqa: E402
from rankwise.mixture.inspect import inspect_mixture  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.train import TrainConfig, train  # noqa: E402

ALL = {"target_modules": "all-linear"}
FLYLORA = {"router": "flylora", "rank": 32, "lora_alpha": 64.0, "top_k": 8, "bias_rate": 1e-3}


def longer_set(n: int) -> list[dict]:
    return [{**r, "task": name} for name, task in LONGER.items() for r in task.test_set(n)]


def em(model, tokenizer, records: list[dict]) -> dict[str, float]:
    """Exact match per task and its mean ("mean")."""
    scores = {t: s["accuracy"] for t, s in exact_match(model, tokenizer, records, 32).items()}
    return scores | {"mean": sum(scores.values()) / len(scores)}


def methods(experts: int, rank: int, angle_rank: int) -> dict[str, dict]:
    """(a), (b) and (c) at E experts; the single LoRA's rank is set in ``single_rank``."""
    shared = {"expert_rank": rank, "num_experts": experts, "lora_alpha": 2.0 * rank, **ALL}
    radar = {"router": "radargate", "angle_rank": angle_rank, **shared}
    return {
        f"softmax {experts}×r{rank}": {"router": "softmax", **shared},
        f"radargate {experts}×r{rank}": radar,
        "single LoRA": {"r": single_rank(radar), **ALL},
    }


def single_rank(radar: dict) -> int:
    """The LoRA rank whose trainable parameters come closest to RadarGate's."""
    settings = {k: v for k, v in radar.items() if k != "router"}
    mixture = build_mixture(load_model().model, "radargate", settings)
    count = sum(p.numel() for p in mixture.parameters())
    model = load_model().model
    per_rank = sum(
        p.numel() for layer in inject_adapter(model, LoraConfig(r=1, **ALL)).values()
        for p in (layer.lora_A, layer.lora_B)
    )  # fmt: skip
    return max(1, round(count / per_rank))


def fit(label: str, settings: dict, common: dict, lrs: list[float], val: list[dict]) -> dict:
    """Train at every learning rate; keep the run with the best validation exact match."""
    best: dict | None = None
    for lr in lrs:
        with tempfile.TemporaryDirectory() as out:
            values = {**common, **settings, "lr": lr, "output_dir": out}
            if "r" in values:
                values.setdefault("lora_alpha", 2.0 * values["r"])
            if "router" in settings:
                result = train_mixture(MixConfig.from_mapping(values))
            else:
                result = train(TrainConfig.from_mapping(values))
        score = em(result.model.eval(), result.tokenizer, val)["mean"]
        print(f"{label} lr {lr:g}: validation EM {100 * score:.1f}", flush=True)
        if best is None or score > best["val"]:
            best = {"result": result, "lr": lr, "val": score}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--expert-rank", type=int, default=4)
    parser.add_argument("--angle-rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--n", type=int, default=30, help="test and generalisation items per task")
    parser.add_argument("--val", type=int, default=20, help="validation items per task")
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--inspect-examples", type=int, default=8)
    parser.add_argument("--no-flylora", action="store_true")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="for every variant (RadarGate keeps E x out values per token and module for the "
        "backward: about 12 GB at E = 16 without it)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="E = 2, 3 steps, 2 items, one lr")
    args = parser.parse_args()
    if args.quick:
        args.experts, args.steps, args.lrs = [2], 3, args.lrs[1:2]
        args.n = args.val = args.inspect_examples = 2
        args.decode_batch, args.new_tokens = 4, 4
    start = time.perf_counter()
    tasks = list(TASKS)
    val = mixed(tasks, n_per_task=args.val, split="validation")
    tests = mixed(tasks, n_per_task=args.n, split="test")
    longer = longer_set(args.n)
    prompts = [r["prompt"] for r in tests[:: max(1, len(tests) // args.decode_batch)]]
    common = dict(
        data="task:all", train_examples=1000, max_steps=args.steps, batch_size=8,
        warmup_steps=min(20, args.steps // 10), dtype="bfloat16", eval_every=0, save_every=0,
        log_every=50, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    rows: list[dict] = []
    groups = {e: methods(e, args.expert_rank, args.angle_rank) for e in args.experts}
    if not args.no_flylora:
        groups[0] = {"flylora R=32 top-8 (official)": {**FLYLORA, **ALL}}
    for experts, group in groups.items():
        decoders, found = {}, {}
        for label, settings in group.items():
            best = fit(label, settings, common, args.lrs, val)
            result = best["result"]
            model, tok = result.model.eval(), result.tokenizer
            row = {
                "label": label if settings.get("r") is None else f"single LoRA r={settings['r']}",
                "E": experts or "", "lr": best["lr"], "val": best["val"],
                "fit": em(model, tok, tests), "general": em(model, tok, longer),
                "params": sum(p.numel() for p in result.trained.parameters()),
                "train_tok_s": result.tokens_per_second, "contrast": "",
            }  # fmt: skip
            if settings.get("router") == "radargate":
                inspected = mixed(tasks, n_per_task=args.inspect_examples, split="validation")
                report = inspect_mixture(model, tok, result.trained, inspected)
                row["contrast"] = f"{report.contrast():+.2f}"
            decoders[label], found[label] = (model, tok, {}), row
            print(row, flush=True)
        speeds = decode_speeds(decoders, prompts, args.new_tokens, rounds=1 if args.quick else 3)
        reference = speeds.get("single LoRA")
        for label, row in found.items():
            row["decode_tok_s"] = speeds[label]
            row["vs_single"] = speeds[label] / reference if reference else None
            rows.append(row)
    body = table(args, rows, tasks, time.perf_counter() - start)
    print(body)
    if not args.quick:
        write_section("mixture-scaling", body)


def table(args, rows: list[dict], tasks: list[str], seconds: float) -> str:
    pct = lambda v: f"{100 * v:.0f}"  # noqa: E731
    lines = [
        [r["label"], r["E"], f"{r['lr']:g}", *(pct(r["fit"][t]) for t in tasks),
         f"{100 * r['fit']['mean']:.1f}", *(pct(r["general"][t]) for t in tasks),
         f"{100 * r['general']['mean']:.1f}", f"{r['params']:,}", f"{r['train_tok_s']:.0f}",
         f"{r['decode_tok_s']:.0f}", "" if r["vs_single"] is None else f"{r['vs_single']:.2f}",
         r["contrast"]]
        for r in rows
    ]  # fmt: skip
    short = [t.split("_")[0] for t in tasks]
    headers = ["variant", "E", "lr", *(f"fit {s}" for s in short), "fit mean",
               *(f"gen {s}" for s in short), "gen mean", "trainable", "train tok/s",
               "decode tok/s", "× single LoRA", "contrast r"]  # fmt: skip
    gaps = []
    for e in args.experts:
        by = {r["label"].split(" ")[0]: r for r in rows if r["E"] == e}
        if "radargate" in by and "softmax" in by:
            fit = 100 * (by["radargate"]["fit"]["mean"] - by["softmax"]["fit"]["mean"])
            gen = 100 * (by["radargate"]["general"]["mean"] - by["softmax"]["general"]["mean"])
            gaps.append(f"E={e}: {fit:+.1f} fitting, {gen:+.1f} generalisation")
    return (
        "## Scaling the number of experts (`bench/mixture_scaling.py`)\n\n"
        f"Machine: {machine()}. SmolLM2-135M-Instruct, bf16 base, fp32 adapters on every linear "
        f"layer, {args.steps} steps (batch 8, AdamW, cosine), the six built-in tasks mixed; "
        f"learning rate chosen per variant from {args.lrs} on {args.val} validation items per "
        f"task. Fitting: {args.n} test items per task; generalisation: {args.n} items per task "
        f"of longer inputs never trained on. Experts of rank {args.expert_rank}, RadarGate's "
        f"angle rank {args.angle_rank}. Decoding relative to the single LoRA of the same E. "
        f"Total time {seconds:.0f} s.\n\n"
        f"Command: `python bench/mixture_scaling.py {shlex.join(sys.argv[1:])}`\n\n"
        + markdown_table(headers, lines)
        + "\n\nRadarGate minus the softmax gate (mean exact match, points): "
        + ("; ".join(gaps) or "none")
        + ". Targets: RadarGate ≥ softmax at every E with the gap growing with E, ≥ the single "
        "LoRA at E ≥ 4, decoding ≥ 0.75× the single LoRA.\n"
    )


if __name__ == "__main__":
    main()

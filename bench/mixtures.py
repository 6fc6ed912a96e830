"""Mixtures of LoRA experts on the built-in tasks: accuracy and speed of every router.

    python bench/mixtures.py --adapters runs/task-adapters [--steps 300] [--n 30]

A single LoRA of total rank R and each router (MoLA, SMoRA, FlyLoRA, RadarGate) are trained with
the same loop and settings on all built-in tasks mixed together (bf16 base, fp32 adapters), with
a trainable-parameter budget of about one rank-R LoRA each (FlyLoRA trains only B, so it gets
2R ranks). X-LoRA mixes the per-task adapters of ``bench/finetune.py quality`` (``--adapters``)
and trains only its classifier. Each is scored by greedy exact match per task, and timed on
greedy decoding of a fixed batch; PEFT's X-LoRA on the same adapters and the bare base model
are timed in the same run. Each router's gates are then inspected on validation items of every
task (``rankwise mix inspect``): which expert each task leans on and, for RadarGate, whether its
rotations are contrastive, with the angle heatmap in docs/images/. Writes the tables into
docs/benchmarks.md (section "mixtures"). The scaling sweep over the number of experts (softmax
gate vs RadarGate vs a single LoRA, the paper's claim) is ``bench/mixture_scaling.py``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402
from merging import task_adapters  # noqa: E402

from rankwise.data.formatting import encode_prompt  # noqa: E402
from rankwise.data.tasks import TASKS, mixed  # noqa: E402
from rankwise.evaluate.accuracy import exact_match  # noqa: E402
from rankwise.evaluate.generation import left_padded  # noqa: E402
from rankwise.mixture import MixConfig, train_mixture  # noqa: E402
from rankwise.mixture.inspect import Report, inspect_mixture, plot_angles  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.train import TrainConfig, train  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
ALL = {"target_modules": "all-linear"}  # every variant with fresh experts adapts every linear


def variants(rank: int, adapters: list[str]) -> dict[str, dict]:
    """Each variant's settings (scaling 2 throughout: alpha / r, SMoRA's alpha / k)."""
    experts = 4
    return {
        f"single LoRA r={rank}": {"r": rank, "lora_alpha": 2 * rank, **ALL},
        f"mola {experts}×r{rank // experts} top-2": {
            "router": "mola", "expert_rank": rank // experts, "lora_alpha": 2 * rank // experts,
            "num_experts": experts, "top_k": 2, "aux_coef": 0.001, **ALL,
        },
        f"smora R={rank} top-{rank // 4}": {
            "router": "smora", "rank": rank, "lora_alpha": 2 * (rank // 4), "top_k": rank // 4,
            **ALL,
        },
        f"flylora R={2 * rank} top-{rank // 4}": {
            "router": "flylora", "rank": 2 * rank, "lora_alpha": 4 * rank, "top_k": rank // 4,
            **ALL,
        },
        f"radargate {experts}×r{rank // experts}": {
            "router": "radargate", "expert_rank": rank // experts,
            "lora_alpha": 2 * rank // experts, "num_experts": experts, **ALL,
        },
        f"xlora {len(adapters)} task adapters": {
            "router": "xlora", "adapters": adapters, "top_k": 0,
        },
    }  # fmt: skip


def decode_speeds(
    entries: dict[str, tuple], prompts: list[str], new_tokens: int, rounds: int = 5
) -> dict[str, float]:
    """Greedy decoding tokens/s of every (model, tokenizer, generate kwargs) on one batch that
    generates exactly ``new_tokens`` per prompt: the best of ``rounds`` rounds that each time
    every entry in turn (the first also warms up), so a slower spell of the machine hits all
    alike."""
    best = dict.fromkeys(entries, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):
            for label, (model, tokenizer, kwargs) in entries.items():
                inputs = left_padded(
                    [encode_prompt(p, tokenizer) for p in prompts], tokenizer.pad_token_id
                )
                start = time.perf_counter()
                model.generate(
                    **inputs, do_sample=False, max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs,
                )  # fmt: skip
                best[label] = min(best[label], time.perf_counter() - start)
    return {label: len(prompts) * new_tokens / seconds for label, seconds in best.items()}


def peft_xlora_speed(adapters: dict[str, Path], prompts, new_tokens: int) -> float:
    """PEFT's X-LoRA (dense scalings, one-layer classifier) on the same adapters, bf16 base."""
    from peft import XLoraConfig, get_peft_model

    loaded = load_model(dtype="bfloat16")
    loaded.model.config.use_cache = False  # PEFT's X-LoRA refuses a KV cache
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=loaded.model.config.hidden_size,
        xlora_depth=1,
        adapters={str(i): str(path) for i, path in enumerate(adapters.values())},  # PEFT's names
    )
    model = get_peft_model(loaded.model, config).eval()
    peft = {"peft": (model, loaded.tokenizer, {})}
    return decode_speeds(peft, prompts, new_tokens, rounds=2)["peft"]  # ~2 min a round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, required=True, help="one adapter per task")
    parser.add_argument("--rank", type=int, default=32, help="total rank R of each variant")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n", type=int, default=30, help="test items per task")
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=None, help="variant name prefixes to run")
    parser.add_argument(
        "--inspect-examples", type=int, default=16, help="validation items per task for routing"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    folders = task_adapters(args.adapters)
    tests = [{**r, "task": name} for name in folders for r in TASKS[name].test_set(args.n, seed=0)]
    prompts = [r["prompt"] for r in tests[:: max(1, len(tests) // args.decode_batch)]]
    prompts = prompts[: args.decode_batch]
    base = load_model(dtype="bfloat16")
    decoders = {"base": (base.model.eval(), base.tokenizer, {})}  # timed together at the end

    common = dict(
        data="task:all", train_examples=1000, max_steps=args.steps, batch_size=8, lr=args.lr,
        warmup_steps=20, dtype="bfloat16", eval_every=0,
        save_every=0, log_every=10,
    )  # fmt: skip
    results: dict[str, dict] = {}
    reports: dict[str, Report] = {}
    inspected = mixed(list(folders), n_per_task=args.inspect_examples, split="validation")
    for label, settings in variants(args.rank, [str(p) for p in folders.values()]).items():
        if args.only is not None and not any(label.startswith(o) for o in args.only):
            continue
        with tempfile.TemporaryDirectory() as out:
            values = {**common, **settings, "output_dir": out}
            if "router" in settings:
                result = train_mixture(MixConfig.from_mapping(values))
            else:
                result = train(TrainConfig.from_mapping(values))
            trainable = sum(p.numel() for p in result.trained.parameters())
        model = result.model.eval()
        scores = exact_match(model, result.tokenizer, tests, batch_size=32)
        if "router" in settings:
            reports[label] = inspect_mixture(model, result.tokenizer, result.trained, inspected)
        decoders[label] = (model, result.tokenizer, {})
        if settings.get("router") == "xlora":
            decoders[f"{label}, no KV cache"] = (model, result.tokenizer, {"use_cache": False})
        results[label] = {
            "scores": {name: scores[name]["accuracy"] for name in folders},
            "trainable": trainable,
            "train_tok_s": result.tokens_per_second,
        }
        print(label, results[label], flush=True)

    speeds = decode_speeds(decoders, prompts, args.new_tokens)
    print("decode tok/s", speeds, flush=True)
    base_speed = speeds.pop("base")
    for label, result in results.items():
        result["decode_tok_s"] = speeds[label]
        if f"{label}, no KV cache" in speeds:
            result["uncached_tok_s"] = speeds[f"{label}, no KV cache"]
    del decoders
    peft_speed = peft_xlora_speed(folders, prompts, args.new_tokens)
    print(f"PEFT X-LoRA: {peft_speed:.1f} tok/s", flush=True)
    for report in reports.values():
        if report.angles_before is not None:  # RadarGate
            IMAGES.mkdir(exist_ok=True)
            plot_angles(report, IMAGES / "radargate-rotation-angles.png")
    routing = routing_table(reports, list(folders))
    seconds = time.perf_counter() - start
    write_table(args, folders, results, base_speed, peft_speed, seconds, routing)


def routing_table(reports: dict[str, Report], tasks: list[str]) -> str:
    """Per router: the expert each task leans on (top mean gate in most layers); RadarGate's
    contrast."""
    rows = []
    for label, report in reports.items():
        top = report.favourites()
        cells = [f"{top[t][0]} ({top[t][1]}/{top[t][2]})" for t in tasks]
        contrast = "" if report.angles_before is None else f"{report.contrast():+.2f}"
        rows.append([label, *cells, len({top[t][0] for t in tasks}), contrast])
    headers = ["router", *tasks, "distinct experts", "corr(pair angle, its change)"]
    return markdown_table(headers, rows)


def write_table(
    args, folders, results, base_speed: float, peft_speed: float, seconds: float, routing: str
):
    """The accuracy and speed table into docs/benchmarks.md."""
    single = next((r for label, r in results.items() if label.startswith("single")), None)
    reference = single["decode_tok_s"] if single else base_speed
    tasks = list(folders)
    rows = []
    for label, r in results.items():
        mean = sum(r["scores"].values()) / len(tasks)
        rows.append(
            [label, *(f"{100 * r['scores'][t]:.0f}" for t in tasks), f"{100 * mean:.1f}",
             f"{r['trainable']:,}", f"{r['train_tok_s']:.0f}",
             f"{r['decode_tok_s']:.0f}", f"{r['decode_tok_s'] / reference:.2f}"]
        )  # fmt: skip
        if "uncached_tok_s" in r:
            rows.append(
                [f"{label}, no KV cache", *[""] * len(tasks), "", "", "",
                 f"{r['uncached_tok_s']:.0f}", f"{r['uncached_tok_s'] / reference:.2f}"]
            )  # fmt: skip
    rows.append(["PEFT X-LoRA (same adapters, untrained classifier)", *[""] * len(tasks), "", "",
                 "", f"{peft_speed:.0f}", f"{peft_speed / reference:.2f}"])  # fmt: skip
    rows.append(["base model, no adapter", *[""] * len(tasks), "", "", "",
                 f"{base_speed:.0f}", f"{base_speed / reference:.2f}"])  # fmt: skip
    headers = ["variant", *tasks, "mean EM %", "trainable params", "train tok/s", "decode tok/s",
               "× single LoRA"]  # fmt: skip
    body = (
        "## Mixtures of LoRA experts (`bench/mixtures.py`)\n\n"
        f"Machine: {machine()}. Model: SmolLM2-135M-Instruct, bf16 base, fp32 adapters on all "
        f"linear layers. Every variant trains {args.steps} steps (batch 8, lr {args.lr}, AdamW, "
        "cosine) on the six built-in tasks mixed (1000 examples each); X-LoRA trains only its "
        f"classifier over the per-task adapters in `{args.adapters}`. Exact match: greedy, "
        f"{args.n} test items per task. Decoding: {args.decode_batch} prompts × "
        f"{args.new_tokens} new tokens, greedy, KV cache, best of five rounds that each decode "
        "with every variant and the base model in turn, after all training. PEFT's X-LoRA "
        "(dense scalings, no KV cache, which it refuses; best of two) runs on the same adapters "
        "in the same run. "
        f"Total time {seconds:.0f} s.\n\n"
        f"Command: `python bench/mixtures.py {shlex.join(sys.argv[1:])}`\n\n"
        + markdown_table(headers, rows)
        + "\n\nTargets: MoLA, SMoRA, FlyLoRA and RadarGate decode at ≥ 0.75× the single LoRA; "
        "rankwise X-LoRA at ≥ 1.2× PEFT's X-LoRA; at least one router above the single LoRA's "
        "mean exact match.\n\n"
        f"Routing (`rankwise mix inspect`'s numbers, {args.inspect_examples} validation items "
        "per task): per task the expert (rank, for SMoRA and FlyLoRA) with the top mean gate in "
        "most adapted modules, and in how many of them. RadarGate's rotations count as "
        "contrastive, the paper's claim, when a pair's angle before rotation correlates "
        "positively with the change the rotation makes to it (close pairs drawn together, "
        "distant ones pushed apart); the pair angles are drawn in "
        "`docs/images/radargate-rotation-angles.png`.\n\n" + routing
    )
    write_section("mixtures", body)
    print(body)


if __name__ == "__main__":
    main()

"""Quantised bases on the embedded model: perplexity with and without low-rank parts; speed.

    python bench/quantize.py [--quick] [--eval-tokens 2048] [--rank 16 --iters 5]
        [--samples 32 --seq-len 256] [--batch 4 --tokens 256 --steps 10]

Perplexity (corpus test split, no fine-tuning): the dense model; NF4/NF3/NF2 (rankwise's NF-k,
block 64) plain and with LoftQ (rank ``--rank``, ``--iters`` steps); bitsandbytes NF4; EoRA
(rank ``--rank``) on NF3 and on the 2:4-pruned model, with calibration statistics of the
compressed model on the corpus train split. Speed: one training step of r16 all-linear LoRA at
``--batch`` x ``--tokens`` on a dense base (``--dense-dtype``), on rankwise's bitsandbytes-NF4
base and with PEFT's QLoRA on the same NF4 base; each in its own process so its peak RSS is its
own. ``--quick`` shrinks everything to check the script in a couple of minutes (its numbers mean
nothing). Writes the tables into docs/benchmarks.md (section "quantization") unless --quick.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.adapters import LoraConfig, attach_adapters, inject_adapter  # noqa: E402
from rankwise.adapters.peft_format import LoraWeights  # noqa: E402
from rankwise.compress import compress  # noqa: E402
from rankwise.compress.calibration import calibration_data  # noqa: E402
from rankwise.data.corpus import python_docs  # noqa: E402
from rankwise.evaluate.perplexity import perplexity  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.quantize import BASES, quantize_model, weight_report  # noqa: E402
from rankwise.quantize.compensate import compensate  # noqa: E402
from rankwise.quantize.loftq import LoftQ  # noqa: E402
from rankwise.quantize.registry import METHODS  # noqa: E402


def quality_rows(args) -> list[list[str]]:
    dense = load_model()
    texts = python_docs("test")

    def ppl(model) -> float:
        return perplexity(
            model, dense.tokenizer, texts, window=args.window, stride=args.window // 2,
            batch_size=4, max_tokens=args.eval_tokens,
        )  # fmt: skip

    def row(name: str, model, extra: str = "—") -> list[str]:
        report = weight_report(model)
        value = ppl(model)
        bits = f"{report.bits_per_quantized_weight:.3f}" if report.quantized_weights else "32"
        line = [name, f"{value:.2f}", bits, extra]
        print(" | ".join(line), flush=True)
        return line

    calib = calibration_data(dense.tokenizer, samples=args.samples, seq_len=args.seq_len)
    rows = [row("dense fp32", dense.model)]
    for bits in args.bits:
        model = load_model().model
        METHODS[f"nf{bits}"]().quantize(model, 64)
        rows.append(row(f"NF{bits}", model))
        model = load_model().model
        factors = LoftQ(bits=bits, rank=args.rank, iters=args.iters).quantize(model, 64)
        attach(model, factors, 2.0 * args.rank)
        rows.append(row(f"NF{bits} + LoftQ", model, f"r{args.rank}, T={args.iters}"))
    model = load_model().model
    quantize_model(model, BASES["nf4"], 64)
    rows.append(row("NF4 (bitsandbytes)", model))
    for label, make in (("NF3", nf3), ("2:4 pruned", pruned))[: 1 if args.quick else 2]:
        model = make(dense.tokenizer)
        result = compensate(model, dense.model, "eora", args.rank, 2.0 * args.rank,
                            calib.input_ids)  # fmt: skip
        attach_adapters(model, [result.adapter])
        rows.append(row(f"{label} + EoRA", model, f"r{args.rank}, {len(calib.input_ids)} seqs"))
    return rows


def attach(model, factors, alpha: float) -> None:
    attach_adapters(model, [LoraWeights(factors, dict.fromkeys(factors, alpha))])


def nf3(tokenizer):
    model = load_model().model
    METHODS["nf3"]().quantize(model, 64)
    return model


def pruned(tokenizer):
    model = load_model().model
    compress(model, tokenizer, "prune24", 0.5)
    return model


def speed_one(kind: str, args) -> dict:
    """One configuration's training speed and peak RSS (run in a fresh process)."""
    dtype = args.dense_dtype if kind == "dense" else "float32"
    loaded = load_model(dtype=dtype, quantize=None if kind == "dense" else "nf4")
    model = loaded.model
    if kind == "peft":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftLoraConfig(r=16, lora_alpha=32,
                                                     target_modules="all-linear"))  # fmt: skip
    else:
        inject_adapter(model, LoraConfig(r=16, lora_alpha=32))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(3, 40000, (args.batch, args.tokens), generator=torch.Generator())
    model.train()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    per_step = sorted(times[1:])[len(times[1:]) // 2]  # the median, the first step excluded
    return {
        "tokens_per_s": args.batch * args.tokens / per_step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weight_bytes": weight_report(loaded.model).weight_bytes,
    }


def speed_rows(args, argv: list[str]) -> list[list[str]]:
    rows, results = [], {}
    labels = {"dense": f"dense {args.dense_dtype} + LoRA", "nf4": "NF4 + LoRA (rankwise)",
              "peft": "NF4 + LoRA (PEFT QLoRA)"}  # fmt: skip
    for kind, label in labels.items():
        out = subprocess.run([sys.executable, __file__, *argv, "--speed-one", kind],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        results[kind] = json.loads(out.strip().splitlines()[-1])
        r = results[kind]
        rows.append([label, f"{r['weight_bytes'] / 2**20:.0f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['tokens_per_s']:.0f}",
                     f"{r['peak_rss_mb'] / results['dense']['peak_rss_mb']:.2f}",
                     f"{r['tokens_per_s'] / results['dense']['tokens_per_s']:.2f}"])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dense-dtype", default="bfloat16")
    parser.add_argument("--speed-one", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args()
    if args.quick:
        args.bits, args.rank, args.iters, args.samples, args.seq_len = [3], 4, 1, 2, 64
        args.window, args.eval_tokens, args.batch, args.tokens, args.steps = 64, 128, 1, 32, 1
        args.dense_dtype = "float32"
    torch.manual_seed(0)
    if args.speed_one:
        print(json.dumps(speed_one(args.speed_one, args)))
        return
    argv = [a for a in argv if a != "--quick"] + (["--quick"] if args.quick else [])
    quality = quality_rows(args)
    speed = speed_rows(args, argv)
    body = (
        "## Quantised bases (`bench/quantize.py`)\n\n"
        f"Machine: {machine()}. Model: SmolLM2-135M-Instruct. Perplexity: first "
        f"{args.eval_tokens} tokens of the corpus test split, window {args.window}, no "
        f"fine-tuning; NF-k block 64 with int8 double quantisation; calibration {args.samples} x "
        f"{args.seq_len} tokens of the corpus train split.\n\n"
        + markdown_table(["base", "perplexity", "bits/quantised weight", "low-rank part"], quality)
        + f"\n\nTraining step, r16 all-linear LoRA, batch {args.batch} x {args.tokens}, median "
        f"of {args.steps} steps after the first; each row its own process.\n\n"
        + markdown_table(
            [
                "configuration",
                "weights MiB",
                "peak RSS MiB",
                "tokens/s",
                "RSS x dense",
                "tokens/s x dense",
            ],
            speed,
        )  # fmt: skip
    )
    print(body)
    if not args.quick:
        write_section("quantization", body)


if __name__ == "__main__":
    main()

"""Compression of the embedded model: perplexity and costs of every method against the dense model.

    python bench/compress.py [--ratios 0.1 0.2 0.3] [--samples 32 --seq-len 256]
        [--eval-tokens 2048] [--recover-ratio 0.3 --recover-steps 100]

Calibration statistics for all methods are collected once, on the corpus train split, from the
dense model; each method then compresses a fresh copy of it. Perplexity is measured on the first
``--eval-tokens`` tokens of the corpus test split with a sliding window, for the dense model in
the same run. Then A³ at ``--recover-ratio`` is saved, and a LoRA adapter is trained on it for
``--recover-steps`` steps on the corpus train split (bf16 base, r=16 on all linear layers) with
``rankwise.train``, exactly as ``rankwise train --model COMPRESSED`` would; its perplexity is the
"+ LoRA recovery" row. Writes the table into docs/benchmarks.md (section "compression").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.compress import (  # noqa: E402
    METHODS,
    calibration_data,
    collect_statistics,
    compress,
    compress_model,
    make_compressor,
    merge_needs,
    model_costs,
    save_compressed,
)
from rankwise.data.corpus import python_docs  # noqa: E402
from rankwise.evaluate.perplexity import perplexity  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.train import TrainConfig, train  # noqa: E402


def number(value: float) -> str:
    """Two decimals, or scientific notation for the huge perplexities of broken models."""
    return f"{value:.2f}" if value < 1000 else f"{value:.1e}"


def recovery_row(args, tokenizer, evaluate, base_ppl: float, base_costs) -> list[str]:
    """A³ at ``--recover-ratio``, saved, then a LoRA adapter trained on it: the table row."""
    model = load_model().model
    record = compress(model, tokenizer, "a3", args.recover_ratio, samples=args.samples,
                      seq_len=args.seq_len)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(model, tokenizer, f"{tmp}/model", record)
        config = TrainConfig.from_mapping(
            dict(
                model=f"{tmp}/model", data="corpus:python-docs", output_dir=f"{tmp}/adapter",
                max_steps=args.recover_steps, seq_len=256, batch_size=4, r=16, lora_alpha=32,
                lr=5e-4, warmup_steps=10, dtype="bfloat16", eval_every=0, save_every=0,
            )
        )  # fmt: skip
        result = train(config)
    result.model.float()
    ppl = evaluate(result.model)
    costs = model_costs(model)
    return [
        f"a3 + LoRA recovery ({args.recover_steps} steps, {result.seconds:.0f} s)",
        f"{args.recover_ratio:g}", number(ppl), f"{number(ppl / base_ppl)}×",
        f"{costs.params / 1e6:.1f}", f"{costs.linear_params / base_costs.linear_params:.3f}",
        f"{costs.flops_per_token / base_costs.flops_per_token:.3f}",
        f"{costs.kv_bytes_per_token:,}", "—",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--recover-ratio", type=float, default=0.3)
    parser.add_argument("--recover-steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)

    dense = load_model()
    texts = python_docs("test")

    def evaluate(model: torch.nn.Module) -> float:
        return perplexity(
            model, dense.tokenizer, texts, window=args.window, stride=args.stride,
            batch_size=4, max_tokens=args.eval_tokens,
        )  # fmt: skip

    base_costs = model_costs(dense.model)
    base_ppl = evaluate(dense.model)
    print(f"dense perplexity {base_ppl:.3f}", flush=True)
    calib = calibration_data(dense.tokenizer, samples=args.samples, seq_len=args.seq_len)
    compressors = {name: make_compressor(name) for name in args.methods}
    needs = merge_needs(*(c.needs(dense.model) for c in compressors.values()))
    start = time.perf_counter()
    stats = collect_statistics(dense.model, calib.input_ids, needs)
    calib_seconds = time.perf_counter() - start

    rows = [["dense", "0", f"{base_ppl:.2f}", "—", f"{base_costs.params / 1e6:.1f}",
             "1.000", "1.000", f"{base_costs.kv_bytes_per_token:,}", "—"]]  # fmt: skip
    for ratio in args.ratios:
        for name, compressor in compressors.items():
            model = load_model().model
            start = time.perf_counter()
            compress_model(model, compressor, ratio, stats)
            seconds = time.perf_counter() - start
            costs = model_costs(model)
            ppl = evaluate(model)
            row = [
                name, f"{ratio:g}", number(ppl), f"{number(ppl / base_ppl)}×",
                f"{costs.params / 1e6:.1f}",
                f"{costs.linear_params / base_costs.linear_params:.3f}",
                f"{costs.flops_per_token / base_costs.flops_per_token:.3f}",
                f"{costs.kv_bytes_per_token:,}", f"{seconds:.0f}",
            ]  # fmt: skip
            print(" | ".join(row), flush=True)
            rows.append(row)
            del model

    if args.recover_steps:
        rows.append(recovery_row(args, dense.tokenizer, evaluate, base_ppl, base_costs))
        print(" | ".join(rows[-1]), flush=True)

    headers = ["method", "ratio", "perplexity", "vs dense", "params (M)",
               "decoder linear params × dense", "FLOPs/token × dense", "KV bytes/token",
               "compress s"]  # fmt: skip
    record = calib.record()
    body = (
        "## Compressing the base model (`bench/compress.py`)\n\n"
        f"Machine: {machine()}. Model: {dense.name}, fp32. Calibration: {record['samples']} × "
        f"{record['seq_len']} tokens of `{record['data']}` ({record['split']} split, seed "
        f"{record['seed']}), statistics collected once from the dense model in "
        f"{calib_seconds:.0f} s and shared by all methods. Perplexity: first {args.eval_tokens} "
        f"tokens of the corpus test split, window {args.window}, stride {args.stride}, dense "
        f"model measured in the same run. FLOPs/token count all matrix products at a "
        f"{base_costs.context}-token context. Default method settings (asvd α = 0.5; svd-llm "
        f"and a3 damping 0.01); no fine-tuning, except the last row: A³ at "
        f"{args.recover_ratio:g} saved and a LoRA (r=16, all linear layers, bf16 base) trained on "
        f"it for {args.recover_steps} steps of 4 × 256 tokens of the corpus train split with "
        f"`rankwise.train`.\n\n"
        f"{markdown_table(headers, rows)}\n\n"
        "ratio = fraction of decoder linear-layer parameters removed. The SVD family keeps "
        "K/V widths (KV cache unchanged) and adds one matrix product per layer; A³ narrows "
        "heads and the MLP, so the KV cache and attention FLOPs shrink with it. The recovery "
        "adapter trains on the corpus whose test split the perplexity reads, so it also adapts "
        "the model to that domain (a LoRA on the dense model would gain too); its parameters "
        "are not counted in the row."
    )
    print(body)
    write_section("compression", body)


if __name__ == "__main__":
    main()

"""Quantised bases on the embedded model: perplexity with and without low-rank parts; speed.

    python bench/quantize.py [--quick] [--parts quality finetune speed] [--eval-tokens 2048]
        [--rank 16 --iters 5] [--samples 32 --seq-len 256] [--batch 4 --tokens 256 --steps 10]
        [--lq-budgets 2.5 3 3.5] [--task reverse_words --ft-steps 100 --ft-lr 1e-3]

Perplexity (corpus test split, no fine-tuning): the dense model; NF4/NF3/NF2 (rankwise's NF-k,
block 64) plain and with LoftQ (rank ``--rank``, ``--iters`` steps); LQ-LoRA (rank ``--rank``,
at most ``--iters`` alternations) at each of ``--lq-budgets`` average bits of the quantised
part (NF-k constants included, the paper's count: the low-rank part is the same for every
configuration and shown beside), data-free and with the Fisher at the budget nearest 3;
bitsandbytes NF4; EoRA (rank ``--rank``) on NF3, on the 2:4-pruned model and on A³ at 30%, with
calibration statistics of the compressed model on the corpus train split. Fine-tuning: exact
match on the test split of ``--task`` after ``--ft-steps`` steps of r16 LoRA on a bf16 base, on
QLoRA's bitsandbytes NF4, on a LoftQ NF3 base from its low-rank part (``rankwise quantize``, then
``--init-adapter``), and L4Q 4- and 3-bit merged into one quantised matrix (no LoRA branch).
Speed: one training step of r16 all-linear LoRA at ``--batch`` x ``--tokens`` on a dense base
(``--dense-dtype``), on rankwise's bitsandbytes-NF4 base computing in that dtype (QLoRA's
setting), with PEFT's QLoRA on the same NF4 base, on rankwise's NF3 (NF-k, LoftQ's 3-bit base),
L4Q 4-bit training on the fp32 weight, and the
dense and NF4 rows again with gradient checkpointing (QLoRA's recipe: activations, most of the
memory at this batch, are recomputed in the backward, so the weights' share shows); each in
its own process so its peak RSS is its own. ``--quick`` shrinks everything to check the script
in a few minutes (its numbers mean nothing). ``--parts`` picks the tables;
each writes its own section of docs/benchmarks.md ("quantization", "quantization-finetune",
"quantization-speed") unless --quick.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, peak_rss_mb, reset_peak_rss, write_section  # noqa: E402

from rankwise.adapters import LoraConfig, attach_adapters, inject_adapter  # noqa: E402
from rankwise.adapters.peft_format import LoraWeights  # noqa: E402
from rankwise.cli import main as cli  # noqa: E402
from rankwise.compress import compress  # noqa: E402
from rankwise.compress.calibration import calibration_data  # noqa: E402
from rankwise.data import get_task  # noqa: E402
from rankwise.data.corpus import python_docs  # noqa: E402
from rankwise.evaluate.accuracy import exact_match  # noqa: E402
from rankwise.evaluate.perplexity import perplexity  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.quantize import BASES, quantizable, quantize_model, weight_report  # noqa: E402
from rankwise.quantize.compensate import compensate  # noqa: E402
from rankwise.quantize.l4q import export_l4q  # noqa: E402
from rankwise.quantize.loftq import LoftQ  # noqa: E402
from rankwise.quantize.lqlora import LQLoRA  # noqa: E402
from rankwise.quantize.registry import METHODS  # noqa: E402
from rankwise.train import TrainConfig, train  # noqa: E402


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
        extra = f"r{args.rank}, T={args.iters}, {low_rank_bits(factors, model)}"
        attach(model, factors, 2.0 * args.rank)
        rows.append(row(f"NF{bits} + LoftQ", model, extra))
    rows += lq_lora_rows(args, row)
    model = load_model().model
    quantize_model(model, BASES["nf4"], 64)
    rows.append(row("NF4 (bitsandbytes)", model))
    bases = (("NF3", nf3), ("2:4 pruned", pruned), ("A³ 30%", a3))
    for label, make in bases[: 1 if args.quick else 3]:
        model = make(dense.tokenizer)
        if label != "NF3":  # NF3 alone is a row above
            rows.append(row(label, model))
        result = compensate(model, dense.model, "eora", args.rank, 2.0 * args.rank,
                            calib.input_ids)  # fmt: skip
        attach_adapters(model, [result.adapter])
        layers = len(result.adapter.factors)  # A³: o_proj and down_proj, by regression
        extra = f"r{args.rank}, {len(calib.input_ids)} seqs, {layers} layers"
        rows.append(row(f"{label} + EoRA", model, extra))
    return rows


def lq_lora_rows(args, row) -> list[list[str]]:
    """LQ-LoRA at each budget from one table of measured errors, then with the Fisher."""
    rows = []
    fisher_budget = min(args.lq_budgets, key=lambda b: abs(b - 3))
    for fisher, budgets in ((False, args.lq_budgets), (True, [fisher_budget])):
        method = LQLoRA(
            bits_budget=budgets[0], bits_choices=args.lq_bits, block_choices=args.lq_blocks,
            low_rank_bits=0, rank=args.rank, alpha=2.0 * args.rank, iters=args.iters,
            fisher=fisher, samples=args.samples, seq_len=args.seq_len,
        )  # fmt: skip
        dense = load_model()
        modules = quantizable(dense.model)
        weights = method.fisher_of(dense.model, modules, method.calibration(dense.tokenizer))
        table = method.cost_table(modules, method.configurations(64), weights)
        for budget in budgets:
            model = load_model().model
            factors = method.apply(model, table.choose(budget), weights)
            mix = sorted({(m.bits, m.block) for m in quantizable_layers(model)})
            extra = f"r{args.rank}, ≤{args.iters} iters, {low_rank_bits(factors, model)}, {mix}"
            attach(model, factors, method.alpha)
            label = f"LQ-LoRA{' Fisher' if fisher else ''} ≤ {budget:g} bits"
            rows.append(row(label, model, extra))
    return rows


def quantizable_layers(model) -> list:
    from rankwise.quantize import NFkLinear

    return [m for m in model.modules() if isinstance(m, NFkLinear)]


def low_rank_bits(factors, model) -> str:
    """What the low-rank part adds per quantised weight, at 16 bits a value."""
    values = sum(a.numel() + b.numel() for a, b in factors.values())
    return f"+{16 * values / weight_report(model).quantized_weights:.2f} bits (16-bit low rank)"


FINETUNES = {
    "LoRA, bf16 base": {"dtype": "bfloat16"},
    "QLoRA (bitsandbytes NF4)": {"quantize": "nf4"},
    "LoftQ-initialised NF3 (r16, T=5)": {"loftq_bits": 3},
    "L4Q 4-bit, merged": {"l4q_bits": 4},
    "L4Q 3-bit, merged": {"l4q_bits": 3},
}


def finetune_rows(args) -> list[list[str]]:
    """Exact match after fine-tuning one task; L4Q is exported to its quantised matrices first."""
    test = get_task(args.task).test_set(args.test_examples)
    rows = []
    for label, variant in FINETUNES.items():
        with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as base:
            variant = loftq_start(base, args, **variant)
            config = TrainConfig.from_mapping({
                "data": f"task:{args.task}", "output_dir": out, "max_steps": args.ft_steps,
                "r": 16, "lora_alpha": 32, "lr": args.ft_lr, "batch_size": 8,
                "warmup_steps": min(10, args.ft_steps // 5), "eval_every": 0, "seq_len": 128,
                "l4q_group": 64, **variant,
            })  # fmt: skip
            result = train(config)
        model = result.model
        if "l4q_bits" in variant:
            export_l4q(model)  # from here on no LoRA branch: one quantised matrix per layer
        score = exact_match(model, result.tokenizer, test)["all"]["accuracy"]
        report = weight_report(model)
        quantized = report.quantized_weights
        bits = f"{report.bits_per_quantized_weight if quantized else report.bits_per_parameter:.3f}"
        rows.append([label, f"{score:.1%}", bits])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def loftq_start(folder: str, args, loftq_bits: int = 0, **variant) -> dict:
    """With ``loftq_bits``: the LoftQ model written by ``rankwise quantize`` into ``folder``, and
    the training keys that start from it and its low-rank part; otherwise ``variant`` as given."""
    if not loftq_bits:
        return variant
    quantize = ["quantize", "--method", "loftq", "--bits", str(loftq_bits), "--quant-block", "64",
                "--rank", "16", "--alpha", "32", "--iters", str(args.iters),
                "-o", f"{folder}/model"]  # fmt: skip
    if cli(quantize) != 0:
        raise SystemExit("rankwise quantize --method loftq failed")
    return {**variant, "model": f"{folder}/model", "init_adapter": f"{folder}/model/adapter"}


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


def a3(tokenizer):
    model = load_model().model
    compress(model, tokenizer, "a3", 0.3)
    return model


def speed_one(kind: str, args) -> dict:
    """One configuration's training speed and peak RSS (run in a fresh process)."""
    reset_peak_rss()
    runtime = peak_rss_mb()  # the libraries alone, before any model: the same in every row
    # QLoRA's setting: NF4 storage, computed in the dense base's dtype (bf16)
    quantize = "nf4" if kind in ("nf4", "nf4_ckpt", "peft") else None
    loaded = load_model(dtype="float32" if kind == "l4q" else args.dense_dtype, quantize=quantize)
    model = loaded.model
    if kind == "nf3":  # rankwise's own NF-k (LoftQ's 3-bit base), dequantised in each pass
        METHODS["nf3"]().quantize(model, 64)
    if kind == "peft":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftLoraConfig(r=16, lora_alpha=32,
                                                     target_modules="all-linear"))  # fmt: skip
    else:  # L4Q trains from the fp32 weight (its grid is learnt on it)
        l4q = {"l4q_bits": 4, "l4q_group": 64} if kind == "l4q" else {}
        inject_adapter(model, LoraConfig(r=16, lora_alpha=32, **l4q))
    if kind.endswith("_ckpt"):  # QLoRA's recipe recomputes activations in the backward
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(3, 40000, (args.batch, args.tokens), generator=torch.Generator())
    model.train()
    load_peak = peak_rss_mb()
    reset_peak_rss()  # from here: the memory training holds, the load's transient copies gone
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
        "peak_rss_mb": peak_rss_mb(),
        "load_peak_rss_mb": load_peak,
        "runtime_rss_mb": runtime,
        "weight_bytes": weight_report(loaded.model).weight_bytes,
    }


def speed_rows(args, argv: list[str]) -> list[list[str]]:
    rows, results = [], {}
    labels = {"dense": f"dense {args.dense_dtype} + LoRA", "nf4": "NF4 + LoRA (rankwise QLoRA)",
              "peft": "NF4 + LoRA (PEFT QLoRA)", "nf3": "NF3 (rankwise NF-k) + LoRA",
              "l4q": "L4Q 4-bit (fp32 weight)",
              "dense_ckpt": f"dense {args.dense_dtype} + LoRA, gradient checkpointing",
              "nf4_ckpt": "NF4 + LoRA, gradient checkpointing (QLoRA's recipe)"}  # fmt: skip
    for kind, label in labels.items():
        out = subprocess.run([sys.executable, __file__, *argv, "--speed-one", kind],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        results[kind] = json.loads(out.strip().splitlines()[-1])
        r = results[kind]
        rows.append([label, f"{r['weight_bytes'] / 2**20:.0f}", f"{r['load_peak_rss_mb']:.0f}",
                     f"{r['peak_rss_mb']:.0f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['runtime_rss_mb']:.0f}",
                     f"{model_rss(r) / model_rss(results['dense']):.2f}",
                     f"{r['tokens_per_s'] / results['dense']['tokens_per_s']:.2f}"])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    return rows


def model_rss(result: dict) -> float:
    """Training's peak RSS less the libraries' own: the memory the model and its training take."""
    return result["peak_rss_mb"] - result["runtime_rss_mb"]


PARTS = ["quality", "finetune", "speed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS,
                        help="tables to measure; each rewrites its own section")  # fmt: skip
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
    parser.add_argument("--lq-budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5])
    parser.add_argument("--lq-bits", nargs="+", type=int, default=[2, 3, 4, 8])
    parser.add_argument("--lq-blocks", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--task", default="reverse_words")
    parser.add_argument("--ft-steps", type=int, default=100)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--test-examples", type=int, default=50)
    parser.add_argument("--speed-one", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args()
    if args.quick:
        args.bits, args.rank, args.iters, args.samples, args.seq_len = [3], 4, 1, 2, 64
        args.window, args.eval_tokens, args.batch, args.tokens, args.steps = 64, 128, 1, 32, 1
        args.dense_dtype = "float32"
        args.lq_budgets, args.lq_bits, args.lq_blocks = [3.5], [3, 4], [64]
        args.ft_steps, args.test_examples = 2, 2
    torch.manual_seed(0)
    if args.speed_one:
        print(json.dumps(speed_one(args.speed_one, args)))
        return
    argv = [a for a in argv if a != "--quick"] + (["--quick"] if args.quick else [])
    setting = f"Machine: {machine()}. Model: SmolLM2-135M-Instruct."
    sections = {}
    if "quality" in args.parts:
        sections["quantization"] = (
            "## Quantised bases: perplexity (`bench/quantize.py --parts quality`)\n\n"
            f"{setting} First {args.eval_tokens} tokens of the corpus test split, window "
            f"{args.window}, no fine-tuning; NF-k block 64 with int8 double quantisation; "
            f"calibration {args.samples} x {args.seq_len} tokens of the corpus train split.\n\n"
            + markdown_table(
                ["base", "perplexity", "bits/quantised weight", "low-rank part"], quality_rows(args)
            )
        )
    if "finetune" in args.parts:
        sections["quantization-finetune"] = (
            "## Quantised bases: fine-tuning (`bench/quantize.py --parts finetune`)\n\n"
            f"{setting} Task {args.task}, {args.ft_steps} steps, r16 α32 all-linear, batch 8, "
            f"lr {args.ft_lr:g}, exact match on {args.test_examples} test prompts (greedy); L4Q "
            "rows are scored after export (codes and a float16 step and offset per group of 64: "
            "no LoRA branch); the LoftQ row trains from `rankwise quantize --method loftq` with "
            "`--init-adapter`, its NF3 base frozen.\n\n"
            + markdown_table(
                ["configuration", "exact match", "bits/weight (quantised, or all)"],
                finetune_rows(args),
            )
        )
    if "speed" in args.parts:
        columns = ["configuration", "weights MiB", "peak RSS loading MiB", "peak RSS training MiB",
                   "tokens/s", "RSS of libraries MiB", "(training − libraries) x dense",
                   "tokens/s x dense"]  # fmt: skip
        sections["quantization-speed"] = (
            "## Quantised bases: training step (`bench/quantize.py --parts speed`)\n\n"
            f"{setting} r16 all-linear LoRA, batch {args.batch} x {args.tokens}, median of "
            f"{args.steps} steps after the first; each row its own process; peak RSS (VmHWM) "
            "while loading, then reset and measured over the training steps; the libraries' RSS "
            "(torch, transformers, bitsandbytes, PEFT) is measured before any model loads, and "
            "both ratios are over the first row (no checkpointing), memory as what training "
            "holds beyond the libraries.\n\n" + markdown_table(columns, speed_rows(args, argv))
        )
    for name, body in sections.items():
        print(body)
        if not args.quick:
            write_section(name, body)


if __name__ == "__main__":
    main()

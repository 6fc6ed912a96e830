"""Forward throughput of a LoRA-adapted model: bare base, rankwise unmerged/merged, PEFT unmerged.

    python bench/lora_forward.py [--batch 8] [--seq-len 256] [--rank 16] [--repeats 5]

All four variants run on the same embedded model, inputs and adapter weights in one process; the
variants are interleaved per repeat so machine noise hits them alike, and the median time is
reported. Writes the table into docs/benchmarks.md (section "lora_forward").
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.adapters import (  # noqa: E402
    LoraConfig,
    expert_layers,
    inject_adapter,
    merge_experts,
    save_adapter,
)
from rankwise.models import load_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@torch.inference_mode()
def seconds(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=tokens, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    loaded = load_model()
    base = loaded.model
    tokens = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len))
    ours = copy.deepcopy(base)
    inject_adapter(ours, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in expert_layers(ours).values():
            layer.lora_B.normal_(std=1e-3)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(ours, folder, base_model=loaded.name)
        peft = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    merged = copy.deepcopy(ours)
    merge_experts(merged)
    variants = {
        "bare base model": base,
        "rankwise LoRA, unmerged": ours,
        "rankwise LoRA, merged": merged,
        "HF PEFT LoRA, unmerged": peft,
    }
    with torch.inference_mode():
        reference = ours(input_ids=tokens[:1, :32]).logits
        gap = (peft(input_ids=tokens[:1, :32]).logits - reference).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for model in variants.values():  # warm-up
        seconds(model, tokens)
    for _ in range(args.repeats):
        for name, model in variants.items():
            times[name].append(seconds(model, tokens))
    n_tokens = args.batch * args.seq_len
    base_speed = n_tokens / statistics.median(times["bare base model"])
    peft_speed = n_tokens / statistics.median(times["HF PEFT LoRA, unmerged"])
    rows = []
    for name, samples in times.items():
        speed = n_tokens / statistics.median(samples)
        rows.append(
            [name, f"{speed:,.0f}", f"{speed / base_speed:.3f}", f"{speed / peft_speed:.3f}"]
        )
    table = markdown_table(["variant", "tokens/s", "× bare", "× PEFT"], rows)
    body = (
        f"## LoRA forward throughput (`bench/lora_forward.py`)\n\n"
        f"Machine: {machine()}. Model: {loaded.name}, fp32, batch {args.batch} × {args.seq_len} "
        f"tokens, LoRA rank {args.rank} on {', '.join(TARGETS)}; median of {args.repeats} "
        f"interleaved repeats. Max |logit| gap rankwise vs PEFT: {gap:.1e}.\n\n{table}\n\n"
        "Target: rankwise unmerged ≥ 0.95× the bare model and not slower than PEFT."
    )
    print(body)
    write_section("lora_forward", body)


if __name__ == "__main__":
    main()

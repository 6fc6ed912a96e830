"""One adapted layer's time per step: a LoRA, the softmax gate and RadarGate, as E grows.

    python bench/mixture_layer.py [--experts 2 4 8 16] [--quick]

A SmolLM2 MLP up-projection (576 -> 1536, bf16 base, fp32 adapters) with E experts of rank 4
(RadarGate's angle rank 4) against one LoRA of rank 8E (about RadarGate's parameters): the
best time of a training step (forward and backward, 480 tokens), of a prefill forward (320
tokens) and of a decoding forward (16 tokens). Indicative only: a layer, not a model, and on a
shared machine; prints a markdown table (docs/mixtures.md, "Measuring").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

from rankwise.adapters.layer import ExpertSpec, LowRankExperts  # noqa: E402
from rankwise.routers import ROUTERS  # noqa: E402


def layer(experts: int, rank: int, router: str | None) -> LowRankExperts:
    torch.manual_seed(0)
    base = torch.nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    built = LowRankExperts(base, [ExpertSpec(rank, 2.0 * rank)] * experts)
    torch.nn.init.normal_(built.lora_B, std=0.01)
    if router is not None:
        options = ROUTERS[router].options(expert_rank=rank, num_experts=experts)
        built.policy = ROUTERS[router](built, options, 0)
        if router == "radargate":
            torch.nn.init.normal_(built.policy.angle_up, std=0.1)
    return built


def best_ms(module: LowRankExperts, tokens: int, train: bool, rounds: int) -> float:
    x = torch.randn(tokens, 576, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        if train:
            module(x).float().sum().backward()
        else:
            with torch.inference_mode():
                module(x)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--quick", action="store_true", help="E = 2 and 4, fewer rounds")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    experts = [2, 4] if args.quick else args.experts
    rows = []
    for e in experts:
        variants = {f"LoRA r={8 * e}": layer(1, 8 * e, None)}
        variants |= {name: layer(e, 4, name) for name in ("softmax", "radargate")}
        for label, module in variants.items():
            times = [
                best_ms(module, 480, True, rounds),
                best_ms(module, 320, False, rounds * 2),
                best_ms(module, 16, False, rounds * 10),
            ]
            rows.append([e, label, *(f"{t:.2f}" for t in times)])
            print(rows[-1], flush=True)
    headers = ["E", "variant", "train step ms", "prefill ms", "decode ms"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()

"""Top-k routing inside the low-rank experts layer: grouped dispatch vs the dense masked product.

    python bench/routing.py [--min-run-time 0.3]

``routed_sum`` can compute a top-k mixture two ways with the same result: group the tokens by
expert and run only the chosen experts, or run every expert in the two products of a plain LoRA
with the unchosen ones gated to zero. This script times both on one SmolLM2 MLP projection
(576 -> 1536, bf16 base, fp32 factors) for several expert counts, ranks and token counts, forward
and forward + backward, and shows which one ``routers.base.grouped`` picks.
Writes the table into docs/benchmarks.md (section "routing").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest.mock import patch

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.adapters.layer import ExpertSpec, LowRankExperts  # noqa: E402
from rankwise.routers import base  # noqa: E402

SHAPES = [
    (4, 8, 2),
    (8, 16, 2),
    (4, 128, 2),
    (8, 64, 2),
    (16, 64, 2),
    (64, 1, 8),
]  # (experts, rank, k)
TOKENS = [16, 512, 2048]


def microseconds(
    layer: LowRankExperts, x: torch.Tensor, k: int, grouped: bool, backward: bool, run: float
) -> float:
    """Median time of routed_sum on x, with grouped dispatch forced on or off."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(x.shape[0], layer.num_experts, generator=generator)
    weights, chosen = base.top_k_softmax(logits, k)
    gates = base.dense_gates(weights, chosen, layer.num_experts)
    into = layer.base(x)

    def step() -> None:
        out = base.routed_sum(layer, x, gates, chosen, into)
        if backward:
            out.float().sum().backward()

    context = torch.enable_grad() if backward else torch.no_grad()
    forced = {"GROUPED_MIN_SKIPPED_RANKS": 0 if grouped else 10**9, "GROUPED_MIN_TOKENS": 0}
    with context, patch.multiple(base, **forced):
        timer = Timer("step()", globals={"step": step})
        return timer.blocked_autorange(min_run_time=run).median * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per timing")
    args = parser.parse_args()
    rows = []
    for num, rank, k in SHAPES:
        torch.manual_seed(0)
        linear = torch.nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
        layer = LowRankExperts(linear, [ExpertSpec(rank, 2.0 * rank)] * num)
        torch.nn.init.normal_(layer.lora_B, std=0.02)
        skipped = (num - k) * rank / k
        for backward in (False, True):
            for tokens in TOKENS:
                x = torch.randn(tokens, 576, dtype=torch.bfloat16)
                dense = microseconds(layer, x, k, False, backward, args.min_run_time)
                grouped = microseconds(layer, x, k, True, backward, args.min_run_time)
                rows.append([
                    f"{num}×r{rank} top-{k}", f"{skipped:.0f}",
                    "fwd+bwd" if backward else "fwd", tokens, f"{dense:.0f}", f"{grouped:.0f}",
                    f"{grouped / dense:.2f}",
                    "grouped" if base.grouped(layer, k, tokens) else "dense",
                ])  # fmt: skip
                print(rows[-1], flush=True)
    table = markdown_table(
        ["experts", "skipped ranks per chosen expert", "pass", "tokens", "dense µs",
         "grouped µs", "grouped / dense", "rule picks"],
        rows,
    )  # fmt: skip
    write_section(
        "routing",
        (
            "## Top-k routing: grouped dispatch vs dense masked product (`bench/routing.py`)\n\n"
            f"Machine: {machine()}. One 576 → 1536 projection (SmolLM2's MLP), bf16 base, fp32 "
            "factors, `routed_sum` with random top-k gates; median of "
            f"`torch.utils.benchmark` runs of at least {args.min_run_time} s each. The rule "
            f"groups tokens by expert when at least {base.GROUPED_MIN_SKIPPED_RANKS} ranks are "
            f"skipped per chosen expert ((E − k) r / k) and there are at least "
            f"{base.GROUPED_MIN_TOKENS} tokens, and otherwise "
            "runs the dense masked product.\n\n"
            f"Command: `python bench/routing.py`\n\n{table}"
        ),
    )


if __name__ == "__main__":
    main()

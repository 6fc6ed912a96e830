"""LoftQ (arXiv 2310.08659): a quantised base and a LoRA start that together approximate W.

Alternate, for T steps from A = B = 0:   Q_t = quant(W - B A),   B A = rank-r SVD of W - Q_t.
The base stored is Q_T (its codes are exactly those written to disk: the quantiser inside the
loop is the storage's own NF-k, whose 4-bit table is bitsandbytes' NF4), and the adapter starts
at B_T A_T, so at step 0 the adapted model is Q_T + B_T A_T, closer to W than Q alone (a test).

Choices the paper leaves open: the singular values are split evenly between the factors
(A = sqrt(S) V^T, B = U sqrt(S), as the official code does), and B is divided by the adapter's
scaling alpha / r so that s B A is the SVD part; ranks are the same for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.inject import swap_modules
from rankwise.architectures import dense_weight
from rankwise.errors import RankwiseError
from rankwise.options import option
from rankwise.quantize.base import check_blocks, quantizable
from rankwise.quantize.method import Factors, QuantizeMethod
from rankwise.quantize.nfk import NFkLinear, dequantize_weight, quantize_weight


def low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B A the best rank-r approximation of ``residual``."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def loftq_layer(
    weight: torch.Tensor, bits: int, block: int, rank: int, steps: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """LoftQ on one weight [out, in]: (stored NF-k state of Q_T, A_T, B_T), B A unscaled."""
    weight = weight.float()
    a = weight.new_zeros(rank, weight.shape[1])
    b = weight.new_zeros(weight.shape[0], rank)
    for _ in range(steps):
        state = quantize_weight(weight - b @ a, bits, block)
        q = dequantize_weight(state, bits, tuple(weight.shape))
        a, b = low_rank(weight - q, rank)
    return state, a, b


@dataclass
class LoftQ(QuantizeMethod):
    """LoftQ: NF-k base and rank-r start, alternated for ``iters`` steps."""

    name = "loftq"
    bits: int = option(4, "bits of the NF-k base (2, 3, 4 or 8)")
    rank: int = option(16, "rank of the low-rank part (the adapter's r)", within="[1, inf)")
    alpha: float = option(32.0, "lora_alpha of the adapter written (B is divided by alpha/r)")
    iters: int = option(5, "alternating steps T", within="[1, inf)")

    def check(self) -> None:
        super().check()
        if self.bits not in (2, 3, 4, 8):
            raise RankwiseError(f"loftq bits must be 2, 3, 4 or 8, got {self.bits}")

    def adapter_alpha(self) -> float:
        return self.alpha

    @torch.no_grad()
    def quantize(
        self, model: nn.Module, block: int, input_ids: torch.Tensor | None = None
    ) -> Factors:
        modules = quantizable(model)
        check_blocks(modules, block, self.bits)
        factors: Factors = {}
        scaling = self.alpha / self.rank
        for name, module in modules.items():
            weight = dense_weight(module)
            state, a, b = loftq_layer(weight, self.bits, block, self.rank, self.iters)
            has_bias = module.bias is not None
            layer = NFkLinear(*weight.shape[::-1], self.bits, block, has_bias, weight.device)
            layer.load_state(state)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
            swap_modules(model, {name: layer})
            factors[name] = (a, b / scaling)
        return factors

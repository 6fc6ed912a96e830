"""LQ-LoRA (arXiv 2311.12023): W ~ Q + L1 L2, mixed NF-k configurations, Fisher weighting.

Each matrix is decomposed by alternating, from Q = 0 (the paper's Algorithm 1 and the official
code's ``lowrank_quantized_sparse_decomposition``; LoftQ instead starts by quantising W):

    L1 L2 = rank-r SVD of W - Q,     Q = NF-k(W - L1 L2),

stopping when the error ||W - Q - L1 L2|| rises (the decomposition before the rise is kept; the
official code keeps the one after it, which its own comment calls slightly worse).

Fisher weighting (section 3.3): with F the empirical Fisher of W (mean squared per-example
gradients on calibration text), the objective is ||sqrt(F) * (W - Q - L1 L2)||. F is
approximated by a rank-1 matrix of its row and column means, so the weighted low-rank step is
an SVD of D_r (W - Q) D_c with D_r = diag(sqrt(mean_j F_ij)), D_c = diag(sqrt(mean_i F_ij)),
mapped back by D_r^-1, D_c^-1 (the official ``weighted_svd_decomposition``, "two-sided",
means taken before the square root). The quantisation step stays unweighted, as there.

Mixed configuration (section 3.2): with ``bits_budget``, every matrix is decomposed under every
(bits, block) of ``bits_choices`` x ``block_choices``; its (Fisher-weighted) squared error is
the cost and its storage (codes, the NF-k constants and the low-rank part at ``low_rank_bits``
per value) the weight of an integer linear program (``allocation.py``) that keeps the average
at or under the budget.

Choices the papers leave open, made here: the SVD is exact (the official code uses a randomised
one); the low-rank part counts in the budget at 16 bits per value by default (the paper's
budgets exclude it, ``low_rank_bits 0``); the Fisher's row and column means are floored at 1e-8
of their largest before dividing; singular values are split evenly between the factors and B is
divided by the adapter's scaling alpha / r, as for LoftQ.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rankwise.adapters.inject import swap_modules
from rankwise.architectures import dense_weight, is_transposed
from rankwise.compress.calibration import DEFAULT_DATA, calibration_data
from rankwise.errors import RankwiseError
from rankwise.options import option
from rankwise.quantize.allocation import allocate
from rankwise.quantize.base import check_blocks, quantizable
from rankwise.quantize.loftq import low_rank
from rankwise.quantize.method import Factors, QuantizeMethod
from rankwise.quantize.nfk import NFkLinear, dequantize_weight, quantize_weight, storage_bits

WIDTHS = (2, 3, 4, 8)
FLOOR = 1e-8  # of the largest row (column) mean of the Fisher


@dataclass
class Decomposition:
    """One matrix's W ~ Q + B A: Q's stored NF-k tensors, A [r, in], B [out, r], and the error
    of every iteration kept (non-increasing)."""

    state: dict[str, torch.Tensor]
    a: torch.Tensor
    b: torch.Tensor
    errors: list[float]


def fisher_scales(fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_r [out, 1], D_c [1, in]): square roots of the Fisher's row and column means."""
    rows, cols = fisher.mean(1, keepdim=True), fisher.mean(0, keepdim=True)
    rows = rows.clamp_min(FLOOR * rows.max().clamp_min(1e-30))
    cols = cols.clamp_min(FLOOR * cols.max().clamp_min(1e-30))
    return rows.sqrt(), cols.sqrt()


def weighted_low_rank(
    residual: torch.Tensor, rank: int, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the rank-r SVD of D_r R D_c, mapped back: B / D_r, A / D_c."""
    a, b = low_rank(rows * residual * cols, rank)
    return a / cols, b / rows


def squared_error(error: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """||E||^2, or ||sqrt(F) * E||^2 = sum F E^2 with a Fisher."""
    squares = error.double().square()
    return float(squares.sum() if fisher is None else (fisher.double() * squares).sum())


def low_rank_part(
    residual: torch.Tensor, rank: int, scales: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the residual: its rank-r SVD, Fisher-weighted when ``scales`` are given."""
    return (
        low_rank(residual, rank) if scales is None else weighted_low_rank(residual, rank, *scales)
    )


def first_factors(
    weight: torch.Tensor, rank: int, fisher: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first alternation's (A, B), of W itself (Q starts at 0): the same in every (bits,
    block), so the cost table forms it once per matrix."""
    scales = None if fisher is None else fisher_scales(fisher.float())
    return low_rank_part(weight.float(), rank, scales)


def decompose(
    weight: torch.Tensor,
    bits: int,
    block: int,
    rank: int,
    iters: int,
    fisher: torch.Tensor | None = None,
    first: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """LQ-LoRA on one weight [out, in]: at most ``iters`` alternations, fewer if the error rises;
    ``first`` is ``first_factors(weight, rank, fisher)`` if already formed."""
    weight = weight.float()
    scales = None if fisher is None else fisher_scales(fisher.float())
    a, b = first if first is not None else first_factors(weight, rank, fisher)
    kept, errors = None, []
    for step in range(iters):
        state = quantize_weight(weight - b @ a, bits, block)
        q = dequantize_weight(state, bits, tuple(weight.shape))
        error = squared_error(weight - q - b @ a, fisher)
        if errors and error > errors[-1]:
            break
        kept = (state, a, b)
        errors.append(error)
        if step + 1 < iters:
            a, b = low_rank_part(weight - q, rank, scales)
    return Decomposition(*kept, errors)


@dataclass
class CostTable:
    """The ILP's data: per matrix (rows, ``names``) and configuration (columns, ``configs``),
    the squared error of its decomposition and the bits it takes; ``weights`` in all."""

    names: list[str]
    configs: list[tuple[int, int]]
    costs: np.ndarray
    storage: np.ndarray
    weights: int

    def choose(self, bits_budget: float) -> dict[str, tuple[int, int]]:
        """Each matrix's (bits, block) of least summed error within ``bits_budget`` per weight."""
        choice = allocate(self.costs, self.storage, bits_budget * self.weights)
        return {name: self.configs[c] for name, c in zip(self.names, choice, strict=True)}


@torch.enable_grad()
def empirical_fisher(
    model: nn.Module, input_ids: torch.Tensor, modules: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the language-model loss per weight [out, in], one calibration
    sequence at a time (the paper's per-example empirical Fisher), float32."""
    weights = {name: m.weight for name, m in modules.items()}
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    device = next(iter(weights.values())).device
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    try:
        for row in tqdm(input_ids, desc="fisher", unit="seq"):
            ids = row[None].to(device)  # (1, seq_len)
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for total, grad in zip(sums.values(), grads, strict=True):
                total += grad.float().square()
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return {
        name: (total.T if is_transposed(modules[name]) else total) / len(input_ids)
        for name, total in sums.items()
    }


@dataclass
class LQLoRA(QuantizeMethod):
    """LQ-LoRA: NF-k base plus rank-r start by alternation; optional ILP bits and Fisher."""

    name = "lq-lora"
    bits: int = option(4, "bits of every matrix's NF-k part when no bits_budget is given")
    bits_budget: float | None = option(
        None,
        "average bits per weight (quantisation constants and the low-rank part included): an "
        "integer linear program picks each matrix's bits and block from bits_choices x "
        "block_choices (--quant-block is then unused)",
        within="(0, inf)",
    )
    bits_choices: list[int] = option([2, 3, 4, 8], "NF-k widths the allocation may choose")
    block_choices: list[int] = option([16, 32, 64], "block sizes the allocation may choose")
    low_rank_bits: int = option(
        16,
        "bits each low-rank value counts for in the budget (0: the paper's count, Q alone)",
        within="[0, 32]",
    )
    rank: int = option(16, "rank of the low-rank part (the adapter's r)", within="[1, inf)")
    alpha: float = option(32.0, "lora_alpha of the adapter written (B is divided by alpha/r)")
    iters: int = option(
        5, "most alternations; each matrix stops when its error rises", within="[1, inf)"
    )
    fisher: bool = option(False, "weight the decomposition by the empirical Fisher (calib data)")
    calib: str = option(DEFAULT_DATA, "fisher: calibration data, a data spec or path")
    samples: int = option(32, "fisher: calibration sequences", within="[1, inf)")
    seq_len: int = option(256, "fisher: tokens per calibration sequence", within="[2, inf)")
    seed: int = option(0, "fisher: which calibration blocks are drawn")

    def check(self) -> None:
        super().check()
        for width in [self.bits, *self.bits_choices]:
            if width not in WIDTHS:
                raise RankwiseError(f"lq-lora bits must be 2, 3, 4 or 8, got {width}")
        if not self.bits_choices or not self.block_choices:
            raise RankwiseError("lq-lora needs at least one width and one block size to choose")

    def adapter_alpha(self) -> float:
        return self.alpha

    def calibration(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor | None:
        if not self.fisher:
            return None
        spec = {"samples": self.samples, "seq_len": self.seq_len, "seed": self.seed}
        return calibration_data(tokenizer, self.calib, **spec).input_ids

    def configurations(self, block: int) -> list[tuple[int, int]]:
        """The (bits, block) pairs a matrix may take: one without a budget, the grid with one."""
        if self.bits_budget is None:
            return [(self.bits, block)]
        return list(itertools.product(self.bits_choices, self.block_choices))

    def storage(self, module: nn.Module, bits: int, block: int) -> int:
        """Bits one matrix takes in (bits, block), its low-rank part counted as the budget says."""
        out_features, in_features = dense_weight(module).shape
        low = self.low_rank_bits * self.rank * (out_features + in_features)
        return storage_bits(out_features, in_features, bits, block) + low

    @torch.no_grad()
    def cost_table(
        self,
        modules: dict[str, nn.Module],
        configs: list[tuple[int, int]],
        fisher: dict[str, torch.Tensor],
    ) -> CostTable:
        """Every matrix decomposed in every configuration: the ILP's errors and storage."""
        costs = np.zeros((len(modules), len(configs)))
        storage = np.zeros_like(costs)
        progress = tqdm(total=costs.size, desc="lq-lora costs")
        for i, (name, module) in enumerate(modules.items()):
            weight, weighting = dense_weight(module), fisher.get(name)
            first = first_factors(weight, self.rank, weighting)  # shared by every configuration
            for c, (bits, block) in enumerate(configs):
                found = decompose(weight, bits, block, self.rank, self.iters, weighting, first)
                costs[i, c] = found.errors[-1]
                storage[i, c] = self.storage(module, bits, block)
                progress.update()
        progress.close()
        weights = sum(dense_weight(m).numel() for m in modules.values())
        return CostTable(list(modules), configs, costs, storage, weights)

    @torch.no_grad()
    def apply(
        self,
        model: nn.Module,
        chosen: dict[str, tuple[int, int]],
        fisher: dict[str, torch.Tensor],
    ) -> Factors:
        """Decompose each named matrix in its (bits, block), put its NF-k layer in the model."""
        modules = quantizable(model)
        factors: Factors = {}
        scaling = self.alpha / self.rank
        for name, (bits, size) in tqdm(chosen.items(), desc="lq-lora", unit="layer"):
            module = modules[name]
            weight = dense_weight(module)
            found = decompose(weight, bits, size, self.rank, self.iters, fisher.get(name))
            has_bias = module.bias is not None
            layer = NFkLinear(*weight.shape[::-1], bits, size, has_bias, weight.device)
            layer.load_state(found.state)
            if has_bias:
                layer.bias.copy_(module.bias)
            swap_modules(model, {name: layer})
            factors[name] = (found.a, found.b / scaling)
        return factors

    def fisher_of(
        self, model: nn.Module, modules: dict[str, nn.Module], input_ids: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The empirical Fisher of every matrix when ``fisher`` is set, else nothing."""
        if not self.fisher:
            return {}
        if input_ids is None:
            raise RankwiseError("lq-lora with fisher needs calibration data")
        return empirical_fisher(model, input_ids, modules)

    @torch.no_grad()
    def quantize(
        self, model: nn.Module, block: int, input_ids: torch.Tensor | None = None
    ) -> Factors:
        modules = quantizable(model)
        configs = self.configurations(block)
        for bits, size in configs:
            check_blocks(modules, size, bits)
        fisher = self.fisher_of(model, modules, input_ids)
        if len(configs) == 1:
            chosen = dict.fromkeys(modules, configs[0])
        else:
            chosen = self.cost_table(modules, configs, fisher).choose(self.bits_budget)
        return self.apply(model, chosen, fisher)

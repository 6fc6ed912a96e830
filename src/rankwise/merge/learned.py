"""Learned merge coefficients: one weight per adapter and module, trained on a few examples.

The adapters are attached to the model as experts of one layer per module, their factors frozen;
each module's expert weights λ_{m,t} become the only trainable parameters, so the model computes
exactly the weighted sum Σ_t λ_{m,t} s_t B_t A_t that a linear merge writes. Two objectives:

- ``loss`` (LoRA Soups / CAT, arXiv 2410.13025): next-token cross-entropy on the answers of a few
  labeled examples of every task;
- ``entropy`` (AdaMerging, arXiv 2310.02575): the entropy of the model's prediction of the first
  answer token after each unlabeled prompt, no answers read.

Each step sums the objective over one example of every task (taken in turn), then Adam updates
the coefficients. The result folds λ_{m,t} into each adapter's B of module m and merges by linear
(exact at full rank), so it is a plain adapter of rank ≤ Σ r_t. Choices: the coefficients start
at the adapters' weights (1 each by default, the plain sum; AdaMerging starts at 0.3); the
entropy is taken at the last prompt token, the one position every task's prompt shares.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from rankwise.adapters import LoraWeights, attach_adapters, remove_experts
from rankwise.data import IGNORE_INDEX
from rankwise.data.formatting import encode_example
from rankwise.data.sources import load_dataset_spec
from rankwise.errors import RankwiseError
from rankwise.models import LoadedModel, model_device

OBJECTIVES = ("loss", "entropy")


def examples(tokenizer, data: str, samples: int) -> list[tuple[list[int], list[int]]]:
    """The first ``samples`` records of ``data`` encoded: (input ids, labels) each."""
    records = load_dataset_spec(data, split="train").records[:samples]
    if not records:
        raise RankwiseError(f"calibration source '{data}' holds no records")
    encoded = [encode_example(r, tokenizer, max_length=sys.maxsize) for r in records]
    return [(e["input_ids"], e["labels"]) for e in encoded]


def objective(model, ids: list[int], labels: list[int], kind: str, device) -> torch.Tensor:
    """One example's loss (answers' cross-entropy) or first-answer-token entropy."""
    if kind == "entropy":
        prompt = [i for i, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX] or ids
        logits = model(input_ids=torch.tensor([prompt], device=device)).logits[0, -1]  # (V,)
        logp = logits.float().log_softmax(-1)
        return -(logp.exp() * logp).sum()
    tokens = torch.tensor([ids], device=device)
    target = torch.tensor([labels], device=device)
    logits = model(input_ids=tokens).logits[:, :-1].float()  # (1, L - 1, V)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def learn_coefficients(
    loaded: LoadedModel,
    adapters: Sequence[LoraWeights],
    sources: Sequence[str],
    *,
    kind: str = "loss",
    start: Sequence[float] | None = None,
    steps: int = 50,
    lr: float = 0.05,
    samples: int = 16,
) -> list[LoraWeights]:
    """The adapters with their learned per-module coefficients folded into B."""
    if kind not in OBJECTIVES:
        raise RankwiseError(f"unknown objective '{kind}': choose one of {', '.join(OBJECTIVES)}")
    model, device = loaded.model, model_device(loaded.model)
    data = [examples(loaded.tokenizer, source, samples) for source in sources]
    first = list(start) if start is not None else [1.0] * len(adapters)
    layers = attach_adapters(model, list(adapters))
    try:
        coefs = {}
        for name, layer in layers.items():  # expert t of every layer is adapter t (rank 0: absent)
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
            coefs[name] = torch.nn.Parameter(torch.tensor(first, device=device))  # (T,)
            layer.expert_weights = coefs[name]  # the layer's static gates are now parameters
        optimizer = torch.optim.Adam(list(coefs.values()), lr=lr)
        for step in range(steps):
            optimizer.zero_grad()
            total = sum(objective(model, *task[step % len(task)], kind, device) for task in data)
            total.backward()
            optimizer.step()
        learned = {name: p.detach().tolist() for name, p in coefs.items()}
    finally:
        remove_experts(model)
    return [reweighted(w, {m: c[t] for m, c in learned.items()}) for t, w in enumerate(adapters)]


def reweighted(weights: LoraWeights, coefs: dict[str, float]) -> LoraWeights:
    """``weights`` with B of each module multiplied by its coefficient."""
    factors = {m: (a, coefs.get(m, 1.0) * b) for m, (a, b) in weights.factors.items()}
    return LoraWeights(
        factors,
        dict(weights.alphas),
        weights.use_rslora,
        weights.dropout,
        weights.base_model,
        weights.fan_in_fan_out,
    )

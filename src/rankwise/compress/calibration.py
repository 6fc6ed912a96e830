"""Calibration: token blocks from a data spec, and float64 statistics of module inputs.

Statistics are sums over every calibration token divided by the token count, accumulated in
float64 whatever the model's dtype (as A³ and SVD-LLM do; float32 on MPS, see ``precision``), on
the device each input lives on, and collected in one forward pass of the uncompressed model
through forward pre-hooks. Token ids are host data: they are drawn on the CPU and each batch is
moved to the model's device.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rankwise.compress.precision import accumulation_dtype
from rankwise.data.formatting import encode_example
from rankwise.data.sources import load_dataset_spec
from rankwise.errors import RankwiseError

DEFAULT_DATA = "corpus:python-docs"
GRAM, ABS_MEAN, SQ_MEAN = "gram", "abs_mean", "sq_mean"  # E[x xᵀ], E|x_j|, E[x_j²]
MEAN = "mean"  # E[x]
KINDS = (GRAM, ABS_MEAN, SQ_MEAN, MEAN)


@dataclass(frozen=True)
class Calibration:
    """Calibration token blocks (samples, seq_len) and where they came from."""

    input_ids: torch.Tensor  # (samples, seq_len)
    data: str
    split: str
    seed: int

    def record(self) -> dict:
        """What the output folder records about the calibration data."""
        ids = self.input_ids.to(torch.int64).numpy().tobytes()
        samples, seq_len = self.input_ids.shape
        return {
            "data": self.data,
            "split": self.split,
            "samples": samples,
            "seq_len": seq_len,
            "seed": self.seed,
            "tokens": samples * seq_len,
            "sha256": hashlib.sha256(ids).hexdigest(),
        }


def calibration_data(
    tokenizer: PreTrainedTokenizerBase,
    data: str = DEFAULT_DATA,
    *,
    samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    split: str = "train",
) -> Calibration:
    """``samples`` blocks of ``seq_len`` tokens drawn (by ``seed``) from the records of ``data``.

    Records are encoded as training would encode them, joined into one stream and cut into
    blocks; a seeded permutation picks which blocks, kept in stream order.
    """
    if samples < 1 or seq_len < 2:
        raise RankwiseError("calibration needs at least one sample of at least two tokens")
    stream: list[int] = []
    for record in load_dataset_spec(data, split=split).records:
        stream += encode_example(record, tokenizer, max_length=sys.maxsize)["input_ids"]
    blocks = len(stream) // seq_len
    if blocks < samples:
        raise RankwiseError(
            f"calibration data '{data}' holds {len(stream)} tokens, fewer than "
            f"{samples} samples of {seq_len}; ask for fewer or shorter samples"
        )
    ids = torch.tensor(stream[: blocks * seq_len], device="cpu")
    ids = ids.view(blocks, seq_len)  # (blocks, seq_len)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chosen = torch.randperm(blocks, generator=generator, device="cpu")[:samples]
    return Calibration(ids[chosen.sort().values], data, split, seed)


@dataclass
class Statistics:
    """Per-module input statistics, keyed by module name, over ``tokens`` tokens.

    Each lies on the device of the input it describes, in ``accumulation_dtype`` of that device.
    """

    tokens: int
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # E[x xᵀ], (in, in)
    abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # E|x_j|, (in,)
    sq_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # E[x_j²], (in,)
    mean: dict[str, torch.Tensor] = field(default_factory=dict)  # E[x], (in,)


def merge_needs(*needs: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """The union of several {module name: statistic kinds} requests."""
    merged: dict[str, set[str]] = {}
    for need in needs:
        for name, kinds in need.items():
            merged.setdefault(name, set()).update(kinds)
    return merged


def tokens_by_features(x: torch.Tensor) -> torch.Tensor:
    """A module input as (tokens, features) in its device's accumulation dtype."""
    return x.detach().reshape(-1, x.shape[-1]).to(accumulation_dtype(x.device))


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    input_ids: torch.Tensor,
    needs: Mapping[str, set[str]],
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> Statistics:
    """Run ``model`` over ``input_ids`` (samples, seq_len) and return the requested statistics
    (with a progress bar unless a caller shows its own)."""
    unknown = {kind for kinds in needs.values() for kind in kinds} - set(KINDS)
    if unknown:
        raise ValueError(f"unknown statistic kinds {sorted(unknown)}")
    sums: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}

    def accumulate(kind: str, name: str, value: torch.Tensor) -> None:
        sums[kind][name] = sums[kind][name] + value if name in sums[kind] else value

    def hook_for(name: str, kinds: set[str]):
        def hook(module: nn.Module, args: tuple) -> None:
            x = tokens_by_features(args[0])  # (N, in)
            if GRAM in kinds:
                accumulate(GRAM, name, x.T @ x)
            if ABS_MEAN in kinds:
                accumulate(ABS_MEAN, name, x.abs().sum(0))
            if SQ_MEAN in kinds:
                accumulate(SQ_MEAN, name, x.square().sum(0))
            if MEAN in kinds:
                accumulate(MEAN, name, x.sum(0))

        return hook

    handles = [
        model.get_submodule(name).register_forward_pre_hook(hook_for(name, kinds))
        for name, kinds in needs.items()
    ]
    device = next(model.parameters()).device
    try:
        batches = input_ids.split(batch_size)
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = input_ids.numel()
    means = {kind: {n: s / tokens for n, s in sums[kind].items()} for kind in KINDS}
    return Statistics(tokens, means[GRAM], means[ABS_MEAN], means[SQ_MEAN], means[MEAN])


@torch.no_grad()
def cross_moments(
    model: nn.Module,
    reference: nn.Module,
    input_ids: torch.Tensor,
    names: Sequence[str],
    *,
    batch_size: int = 4,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (E[x_c x_cᵀ], E[x x_cᵀ])} for a compressed ``model`` and its original.

    x_c is the input of ``model``'s module ``name``; x is the input of ``reference``'s module
    of that name when the reference's block holding it (its parent: the attention, the MLP)
    runs on exactly what the model's block receives. So both see the same hidden state, and x
    differs from x_c only by what the compression did inside that block (A³'s removed channels
    and heads), not by the error of the layers below. Only the model runs end to end.
    """
    held: dict[str, torch.Tensor] = {}
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def replay(parent: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            reference.get_submodule(parent)(*args, **kwargs)

        return hook

    def hold(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            held[name] = tokens_by_features(args[0])

        return hook

    def pair(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = tokens_by_features(args[0])
            theirs = held.pop(name).to(x.device)
            gram, cross = x.T @ x, theirs.T @ x
            if name in sums:
                gram, cross = sums[name][0] + gram, sums[name][1] + cross
            sums[name] = (gram, cross)

        return hook

    parents = sorted({name.rpartition(".")[0] for name in names})
    handles = [
        model.get_submodule(p).register_forward_pre_hook(replay(p), with_kwargs=True)
        for p in parents
    ]
    handles += [reference.get_submodule(n).register_forward_pre_hook(hold(n)) for n in names]
    handles += [model.get_submodule(n).register_forward_pre_hook(pair(n)) for n in names]
    device = next(model.parameters()).device
    try:
        batches = input_ids.split(batch_size)
        for batch in tqdm(batches, desc="calibrate against the reference", unit="batch"):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = input_ids.numel()
    return {name: (gram / tokens, cross / tokens) for name, (gram, cross) in sums.items()}

"""LoRI (Zhang et al., arXiv 2504.07448): adapters trained to be merged, A frozen and random.

Each task's A is a random projection drawn from the task's own seed and never trained; only B
learns. Random r-dimensional row spaces of a d-dimensional input space barely overlap (about
r / d), so the updates of different tasks act on near-orthogonal inputs and their sum disturbs
each task little: the adapters merge with little interference. The adapter is an ordinary PEFT
adapter; ``lori.json`` beside it records the seed and density, so that merging can say when a
mix loses the benefit.

Choices: A is drawn as init_a draws it (Kaiming-uniform, as nn.Linear and PEFT), from a generator
seeded by (seed, module name), so every module gets its own projection and the same seed gives
the same A on any device; ``a_density`` < 1 keeps that fraction of A's entries (chosen uniformly
at random from the same generator) and rescales them by 1 / sqrt(density), so the projection
keeps its scale.

LoRI-S: a second run with the same seed trains only the B entries whose magnitudes are the
largest ``b_density`` fraction in a first, dense run's adapter (``b_mask``); the others stay zero
(their gradients are masked, and B starts at zero). Choice: one magnitude threshold over every
module's B (model-wise), so the budget goes where the dense run moved B most.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from rankwise.adapters.layer import LowRankExperts
from rankwise.atomic import atomic_file
from rankwise.errors import RankwiseError

LORI_FILE = "lori.json"


def module_seed(seed: int, module: str) -> int:
    """A 63-bit seed for one module's projection, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def freeze_random_a(
    layers: Mapping[str, LowRankExperts], seed: int, a_density: float = 1.0
) -> None:
    """Draw each layer's A from (seed, module name), freeze it and zero B."""
    for name, layer in layers.items():
        a = layer.lora_A
        gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, name))
        bound = 1 / math.sqrt(a.shape[1])  # Kaiming-uniform with a = sqrt(5), as init_a
        drawn = (torch.rand(a.shape, generator=gen, device="cpu") * 2 - 1) * bound  # (R, in)
        if a_density < 1:
            keep = torch.rand(a.shape, generator=gen, device="cpu") < a_density
            drawn = drawn * keep / math.sqrt(a_density)
        a.copy_(drawn.to(a.device, a.dtype))
        a.requires_grad_(False)
        layer.lora_B.zero_()


def b_masks(folder: str | os.PathLike, density: float) -> dict[str, torch.Tensor]:
    """Per module, which B entries are among the ``density`` largest |B| of the whole adapter."""
    from rankwise.adapters.peft_format import read_adapter  # it imports inject, which imports us

    dense = read_adapter(folder)
    magnitudes = torch.cat([b.abs().flatten() for _, b in dense.factors.values()])
    keep = max(1, int(density * magnitudes.numel()))
    threshold = magnitudes.topk(keep).values[-1]
    return {m: b.abs() >= threshold for m, (_, b) in dense.factors.items()}


def mask_b(layers: Mapping[str, LowRankExperts], masks: Mapping[str, torch.Tensor]) -> None:
    """Train only the masked entries of each layer's B (it starts at zero, so the rest stay 0)."""
    missing = sorted(set(layers) - set(masks))
    if missing:
        raise RankwiseError(f"the LoRI-S mask adapter has no B for {missing[0]}")
    for name, layer in layers.items():
        mask = masks[name].to(device=layer.lora_B.device, dtype=layer.lora_B.dtype)
        if mask.shape != layer.lora_B.shape:
            raise RankwiseError(
                f"the LoRI-S mask adapter's B of {name} is {list(mask.shape)}, this run's "
                f"{list(layer.lora_B.shape)}: use a dense run of the same rank and targets"
            )
        layer.lora_B.register_hook(lambda grad, mask=mask: grad * mask)


def write_lori_record(
    folder: str | os.PathLike, seed: int, a_density: float, b_density: float | None = None
) -> None:
    """Record beside a saved adapter that it was trained mergeable (LoRI; LoRI-S: b_density)."""
    record = {"method": "lori", "seed": seed, "a_density": a_density}
    record |= {"b_density": b_density} if b_density is not None else {}
    text = json.dumps(record, indent=2)
    atomic_file(Path(folder) / LORI_FILE, lambda tmp: tmp.write_text(text))


def read_lori_record(folder: str | os.PathLike) -> dict | None:
    """The LoRI record of an adapter folder, or None for an ordinary adapter."""
    path = Path(folder) / LORI_FILE
    return json.loads(path.read_text()) if path.is_file() else None

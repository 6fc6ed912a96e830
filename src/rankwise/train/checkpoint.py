"""Checkpoints that survive a kill: written to a temporary folder, then renamed into place.

A checkpoint folder ``checkpoints/step-000100`` holds the adapter in PEFT's format (so it is
usable on its own), ``optimizer.safetensors`` (AdamW's moments and step counts),
``rng.safetensors`` (the torch generator state) and ``trainer_state.json`` (step, config,
optimizer hyper-parameters, Python's RNG state). The data position is a function of the step
and the seed, so it needs no file. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rankwise.adapters.inject import expert_layers
from rankwise.adapters.peft_format import (
    atomic_write,
    read_adapter,
    weights_from_model,
    write_adapter,
)
from rankwise.errors import RankwiseError

STATE_FILE = "trainer_state.json"


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def save_checkpoint(
    output: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: object,
    base_model: str,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep_last``."""
    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(weights_from_model(model, base_model=base_model), tmp)
    tensors, groups = flatten_optimizer(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    state = {
        "step": step,
        "config": dataclasses.asdict(config),
        "param_groups": groups,
        "python_rng": random.getstate()[1],
    }
    atomic_write(tmp / STATE_FILE, lambda path: Path(path).write_text(json.dumps(state)))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ``.tmp-*`` folders are ignored)."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore adapter weights, optimizer and RNG states in place; returns trainer_state.json."""
    state = json.loads((folder / STATE_FILE).read_text())
    weights = read_adapter(folder)
    with torch.no_grad():
        for name, layer in expert_layers(model).items():
            if name not in weights.factors:
                raise RankwiseError(f"checkpoint '{folder}' has no weights for {name}")
            a, b = layer.expert_factors(0)
            a.copy_(weights.factors[name][0])
            b.copy_(weights.factors[name][1])
    unflatten_optimizer(optimizer, load_file(folder / "optimizer.safetensors"), state)
    torch.set_rng_state(load_file(folder / "rng.safetensors")["torch"])
    random.setstate((3, tuple(state["python_rng"]), None))
    return state


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """AdamW's state as flat safetensors entries ``"<param index>.<name>"`` plus JSON groups."""
    saved = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().clone().contiguous()
        for index, entries in saved["state"].items()
        for name, value in entries.items()
    }
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        for group in saved["param_groups"]
    ]
    return tensors, groups


def unflatten_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict
) -> None:
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        entries.setdefault(int(index), {})[name] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in state["param_groups"]
    ]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})

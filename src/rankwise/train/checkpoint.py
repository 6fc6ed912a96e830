"""Checkpoints that survive a kill: written to a temporary folder, then renamed into place.

A checkpoint folder ``checkpoints/step-000100`` holds the trained weights as the recipe writes
its result (for LoRA an adapter in PEFT's format, usable on its own), ``optimizer.safetensors``
(AdamW's moments and step counts), ``rng.safetensors`` (the torch generator state) and
``trainer_state.json`` (step, config, optimizer hyper-parameters, Python's RNG state). The data
position is a function of the step and the seed, so it needs no file. Nothing is pickled.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rankwise.atomic import atomic_folder

STATE_FILE = "trainer_state.json"


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def save_checkpoint(
    output: Path,
    step: int,
    optimizer: torch.optim.Optimizer,
    config: object,
    keep_last: int,
    write_weights: Callable[[Path], None],
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep_last``.

    ``write_weights(folder)`` writes the trained weights (an adapter or a mixture folder).
    """
    final = checkpoint_root(output) / f"step-{step:06d}"

    def write(folder: Path) -> None:
        write_weights(folder)
        tensors, groups = flatten_optimizer(optimizer)
        save_file(tensors, folder / "optimizer.safetensors")
        save_file(rng_states(), folder / "rng.safetensors")
        state = {
            "step": step,
            "config": config.as_dict(),
            "param_groups": groups,
            "python_rng": random.getstate()[1],
        }
        (folder / STATE_FILE).write_text(json.dumps(state))

    atomic_folder(final, write)
    for old in list_checkpoints(output)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ``.tmp-*`` folders are ignored)."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def load_checkpoint(
    folder: Path, optimizer: torch.optim.Optimizer, read_weights: Callable[[Path], None]
) -> dict:
    """Restore weights (via ``read_weights(folder)``), optimizer and RNG states in place.

    Returns the checkpoint's trainer_state.json.
    """
    state = json.loads((folder / STATE_FILE).read_text())
    read_weights(folder)
    unflatten_optimizer(optimizer, load_file(folder / "optimizer.safetensors"), state)
    restore_rng(load_file(folder / "rng.safetensors"))
    random.setstate((3, tuple(state["python_rng"]), None))
    return state


def rng_states() -> dict[str, torch.Tensor]:
    """The generator states dropout and sampling draw from: CPU, and the accelerator's if any."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Put back what ``rng_states`` saved (an accelerator's state only where it exists)."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """AdamW's state as flat safetensors entries ``"<param index>.<name>"`` plus JSON groups."""
    saved = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
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

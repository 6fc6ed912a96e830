"""What the training loop trains: the ``Trainable`` protocol and its plain-LoRA implementation.

A mixture of experts (``rankwise.mixture.Mixture``) is the other implementation; the loop
never looks inside either.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from rankwise.adapters import (
    LoraConfig,
    LoraWeights,
    check_compatible,
    copy_factors,
    inject_adapter,
    read_adapter,
    save_adapter,
)
from rankwise.adapters.lori import write_lori_record
from rankwise.adapters.policy import POLICY_STATE
from rankwise.adapters.weight_init import DATA_INITS
from rankwise.atomic import atomic_file
from rankwise.errors import RankwiseError
from rankwise.models import LoadedModel, model_device
from rankwise.train.calibrated import calibrated_start
from rankwise.train.config import TrainConfig
from rankwise.train.distributed import World

# Beside a checkpoint's adapter: trained coefficients PEFT's format has no place for (LoLDU,
# NOLA; the adapter holds the plain LoRA they make), so that --resume continues exactly.


class Trainable(Protocol):
    """What the loop trains: its parameters, an auxiliary loss, step bookkeeping, save, load."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates."""
        ...

    def up_factors(self) -> list[torch.nn.Parameter]:
        """The trained B factors among them (LoRA+ gives them a larger learning rate)."""
        ...

    def aux_loss(self) -> torch.Tensor:
        """An extra loss of the last forward (a zero tensor when there is none)."""
        ...

    def after_step(self, world: World) -> None:
        """Bookkeeping after each optimizer step (with the processes to agree with)."""
        ...

    def save(self, folder: Path, base_model: str) -> None:
        """Write the trained weights into ``folder`` (checkpoints and the final result)."""
        ...

    def load(self, folder: Path) -> None:
        """Restore the weights ``save`` wrote (on ``--resume``)."""
        ...


def on_modules(lora: LoraConfig, ranks: dict[str, int], alphas: dict[str, float]) -> LoraConfig:
    """``lora`` on exactly the modules of ``ranks``, each at its own rank and alpha."""
    names = {module: re.escape(module) for module in ranks}
    return dataclasses.replace(
        lora,
        target_modules=list(ranks),
        rank_pattern={names[m]: rank for m, rank in ranks.items()},
        alpha_pattern={names[m]: alphas[m] for m in ranks},
    )


def shaped_like(lora: LoraConfig, start: LoraWeights) -> LoraConfig:
    """``lora`` on exactly the modules of adapter ``start``, each at its rank and alpha."""
    ranks = {module: a.shape[0] for module, (a, _) in start.factors.items()}
    return dataclasses.replace(on_modules(lora, ranks, start.alphas), use_rslora=start.use_rslora)


class LoraAdapter:
    """The default ``Trainable``: one fresh LoRA adapter, saved in PEFT's format."""

    def __init__(self, loaded: LoadedModel, config: TrainConfig):
        self.model = loaded.model
        lora, initial, start = config.lora(), None, None
        if config.init in DATA_INITS:
            lora, initial = calibrated_start(loaded, config)
        if config.init_adapter:
            start = read_adapter(config.init_adapter)
            check_compatible(self.model, start, f"init_adapter '{config.init_adapter}'")
            lora = shaped_like(lora, start)
        self.config = lora
        self.layers = inject_adapter(self.model, lora, initial)
        if start is not None:
            with torch.no_grad():
                copy_factors(self.layers, [start])
        self.device = model_device(self.model)

    def parameters(self) -> list[torch.nn.Parameter]:
        params = [p for layer in self.layers.values() for p in layer.adapter_params().values()]
        return [p for p in params if p.requires_grad]  # LoRI's, LoLDU's, NOLA's frozen

    def up_factors(self) -> list[torch.nn.Parameter]:
        return [layer.lora_B for layer in self.layers.values() if layer.lora_B.requires_grad]

    def aux_loss(self) -> torch.Tensor:
        terms = [layer.policy.regularisation(layer) for layer in self.layers.values()]
        terms = [term for term in terms if term is not None]  # KaSA's, say
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.device)

    def after_step(self, world: World) -> None:
        return None

    def save(self, folder: Path, base_model: str) -> None:
        save_adapter(self.model, folder, base_model=base_model)
        state = {
            f"{name}:{key}": tensor.detach().contiguous().cpu()
            for name, layer in self.layers.items()
            for key, tensor in layer.policy.state().items()
        }
        if state:
            atomic_file(folder / POLICY_STATE, lambda tmp: save_file(state, tmp))
        if self.config.lori_seed is not None:
            lori = self.config
            b_density = lori.lori_b_density if lori.lori_b_mask else None
            write_lori_record(folder, lori.lori_seed, lori.lori_a_density, b_density)

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        weights = read_adapter(folder)
        missing = sorted(set(self.layers) - set(weights.factors))
        if missing:
            raise RankwiseError(f"checkpoint '{folder}' has no weights for {missing[0]}")
        coefficients = {n: layer for n, layer in self.layers.items() if layer.policy.state()}
        copy_factors({n: x for n, x in self.layers.items() if n not in coefficients}, [weights])
        if not coefficients:
            return
        if not (folder / POLICY_STATE).exists():
            raise RankwiseError(f"checkpoint '{folder}' lacks {POLICY_STATE}, needed to resume")
        saved = load_file(folder / POLICY_STATE)
        for name, layer in coefficients.items():
            for key, tensor in layer.policy.state().items():
                tensor.copy_(saved[f"{name}:{key}"])

"""``rankwise mix train``: the training loop of ``rankwise.train`` with a mixture attached.

The loop is the adapter loop (AdamW, schedule, accumulation, metrics, resume) with hooks: the
mixture replaces the single adapter, routers add their auxiliary losses and update their
balancing biases after each step, and checkpoints and the result are mixture folders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from rankwise.errors import RankwiseError
from rankwise.routers import Mixture, RouterConfig, build_mixture, save_mixture
from rankwise.routers.mixture import WEIGHTS_FILE
from rankwise.train.config import TrainConfig
from rankwise.train.distributed import all_reduce_sum, init_world
from rankwise.train.loop import TrainHooks, TrainResult, train


@dataclass
class MixConfig(RouterConfig, TrainConfig):
    """A training config plus a router's settings (``RouterConfig``'s fields win where shared)."""

    data: str = "task:all"  # the built-in tasks mixed together
    output_dir: str = "runs/mixture"  # the mixture folder, checkpoints/, metrics.jsonl, loss.png

    def __post_init__(self) -> None:
        if isinstance(self.adapters, str):  # from the command line: comma-separated folders
            self.adapters = [a for a in self.adapters.split(",") if a]
        TrainConfig.__post_init__(self)
        if self.lora_dropout or self.use_rslora:
            raise RankwiseError("mixtures support neither lora_dropout nor use_rslora yet")
        self.router_config()

    def router_config(self) -> RouterConfig:
        """The router's settings alone (as a saved mixture records them)."""
        names = [f.name for f in dataclasses.fields(RouterConfig)]
        return RouterConfig(**{name: getattr(self, name) for name in names})


class MixtureRecipe:
    """The loop hooks for a mixture; ``mixture`` is set once the loop has attached it."""

    def __init__(self, config: MixConfig):
        self.config = config
        self.mixture: Mixture | None = None

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            attach=self.attach,
            aux_loss=lambda model: self.built.aux_loss(),
            after_step=self.after_step,
            write=lambda model, folder, base: save_mixture(self.built, folder, base),
            read=self.read,
        )

    @property
    def built(self) -> Mixture:
        if self.mixture is None:
            raise RuntimeError("the mixture is not attached yet")
        return self.mixture

    def attach(self, model: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
        self.mixture = build_mixture(model, self.config.router_config())
        return self.mixture.trainable()

    def after_step(self, model: torch.nn.Module) -> None:
        """Routers' bookkeeping on counts summed over all processes (balancing biases agree)."""
        all_reduce_sum(self.built.step_counts(), init_world())
        self.built.after_step()

    def read(self, model: torch.nn.Module, folder: Path) -> None:
        """Restore mixture weights and router buffers from a checkpoint folder."""
        self.built.load_tensors(load_file(folder / WEIGHTS_FILE), f"checkpoint '{folder}'")


def train_mixture(config: MixConfig, resume: bool = False) -> TrainResult:
    """Train a mixture as ``config`` says and write it to ``config.output_dir``."""
    return train(config, resume, MixtureRecipe(config).hooks())

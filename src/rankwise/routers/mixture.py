"""A mixture on a model: experts in every targeted module, a router each, and IO.

On disk a mixture is a folder with ``mixture_config.json`` (the router settings, the base model
and every module's expert specs) and ``mixture.safetensors`` (factors, router parameters and
buffers, and the model-level head); see docs/mixtures.md. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.adapters.inject import inject_experts
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.adapters.peft_format import atomic_write
from rankwise.errors import RankwiseError
from rankwise.routers.base import ROUTERS, Router, RouterConfig

CONFIG_FILE = "mixture_config.json"
WEIGHTS_FILE = "mixture.safetensors"
FORMAT = "rankwise-mixture"
VERSION = 1


@dataclass
class Mixture:
    """The experts layers of a model with their routers, and the router's model-level head."""

    config: RouterConfig
    layers: dict[str, LowRankExperts]
    head: nn.Module

    @property
    def routers(self) -> dict[str, Router]:
        return {name: layer.policy for name, layer in self.layers.items()}

    def trainable(self) -> list[nn.Parameter]:
        """What training updates: each router's choice of factors and parameters, and the head."""
        params = [p for layer in self.layers.values() for p in layer.policy.trainable(layer)]
        return params + list(self.head.parameters())

    def aux_loss(self) -> torch.Tensor:
        """The routers' auxiliary loss of the last forward."""
        return ROUTERS[self.config.router].aux_loss(self.routers)

    def step_counts(self) -> list[torch.Tensor]:
        """Every router's per-step counters (summed over processes before ``after_step``)."""
        return [t for router in self.routers.values() for t in router.step_counts()]

    def after_step(self) -> None:
        for router in self.routers.values():
            router.after_step()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything a saved mixture holds, by safetensors key."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A"] = layer.lora_A
            out[f"{name}.lora_B"] = layer.lora_B
            out |= {f"{name}.router.{k}": v for k, v in layer.policy.state_dict().items()}
        out |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy saved tensors in; every key and shape must match exactly."""
        mine = self.tensors()
        missing, unexpected = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
        if missing or unexpected:
            raise RankwiseError(
                f"{source} does not match this mixture: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        bad = [k for k in mine if mine[k].shape != tensors[k].shape]
        if bad:
            raise RankwiseError(
                f"{source} has wrong shapes at {bad[:5]}: e.g. {list(tensors[bad[0]].shape)} "
                f"where the model needs {list(mine[bad[0]].shape)}"
            )
        for name, layer in self.layers.items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
            layer.policy.load_state_dict(
                {k: tensors[f"{name}.router.{k}"] for k in layer.policy.state_dict()}
            )
        self.head.load_state_dict({k: tensors[f"head.{k}"] for k in self.head.state_dict()})


def build_mixture(model: nn.Module, config: RouterConfig) -> Mixture:
    """Attach fresh experts and routers as ``config`` says (X-LoRA: the given adapters)."""
    router = ROUTERS[config.router]
    layers = inject_experts(model, router.layer_specs(model, config))
    router.initialise(model, layers, config)
    return assemble(model, layers, config)


def assemble(model: nn.Module, layers: dict[str, LowRankExperts], config: RouterConfig) -> Mixture:
    """Give each layer its router and build the head; only the router's choice stays trainable."""
    router = ROUTERS[config.router]
    for index, layer in enumerate(layers.values()):
        layer.policy = router(layer, config, index)
    mixture = Mixture(config, layers, router.head(model, layers, config))
    model.requires_grad_(False)
    for param in mixture.trainable():
        param.requires_grad_(True)
    return mixture


def save_mixture(
    mixture: Mixture, folder: str | os.PathLike, base_model: str | None = None
) -> Path:
    """Write the mixture folder (JSON config + safetensors); returns its path."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": base_model,
        "router_config": dataclasses.asdict(mixture.config),
        "layers": {
            name: [dataclasses.asdict(spec) for spec in layer.experts]
            for name, layer in mixture.layers.items()
        },
    }
    atomic_write(path / WEIGHTS_FILE, lambda p: save_file(mixture.tensors(), p))
    atomic_write(path / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return path


def read_mixture_config(folder: str | os.PathLike) -> dict:
    """The parsed ``mixture_config.json`` of a mixture folder, checked for format and version."""
    file = Path(folder) / CONFIG_FILE
    if not file.is_file():
        raise RankwiseError(f"'{folder}' is not a mixture folder: it has no {CONFIG_FILE}")
    saved = json.loads(file.read_text())
    if saved.get("format") != FORMAT or saved.get("version") != VERSION:
        raise RankwiseError(f"'{file}' is not a {FORMAT} version {VERSION} config")
    return saved


def load_mixture(model: nn.Module, folder: str | os.PathLike) -> Mixture:
    """Attach a saved mixture to ``model`` (the base it was trained on) and load its weights."""
    saved = read_mixture_config(folder)
    config = RouterConfig(**saved["router_config"])
    specs = {name: [ExpertSpec(**s) for s in specs] for name, specs in saved["layers"].items()}
    mixture = assemble(model, inject_experts(model, specs), config)
    mixture.load_tensors(load_file(Path(folder) / WEIGHTS_FILE), f"mixture '{folder}'")
    return mixture

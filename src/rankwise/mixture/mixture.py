"""A mixture on a model: experts in every targeted module, a router each, and IO.

A ``Mixture`` is also what ``rankwise.train`` trains (a ``Trainable``): its parameters, the
routers' auxiliary loss, their bookkeeping after each step, saving and loading.

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
from rankwise.atomic import atomic_file
from rankwise.errors import RankwiseError
from rankwise.models import model_device
from rankwise.options import Options
from rankwise.routers import ROUTERS, Router
from rankwise.train.distributed import World, all_reduce_sum

CONFIG_FILE = "mixture_config.json"
WEIGHTS_FILE = "mixture.safetensors"
FORMAT = "rankwise-mixture"
SINGLE = World()  # one process
VERSION = 2  # 2: each router's own settings (1 had one shared RouterConfig; read by upgrade_v1)


@dataclass
class Mixture:
    """The experts layers of a model with their routers, and the router's model-level head."""

    router: str
    options: Options  # the router's own settings (``ROUTERS[router].options``)
    layers: dict[str, LowRankExperts]
    head: nn.Module

    @property
    def routers(self) -> dict[str, Router]:
        return {name: layer.policy for name, layer in self.layers.items()}

    def parameters(self) -> list[nn.Parameter]:
        """What training updates: each router's choice of factors and parameters, and the head."""
        params = [p for layer in self.layers.values() for p in layer.policy.trainable(layer)]
        return params + list(self.head.parameters())

    def up_factors(self) -> list[nn.Parameter]:
        """The B factors the routers train (LoRA+ gives them a larger learning rate)."""
        trained = {id(p) for p in self.parameters()}
        return [layer.lora_B for layer in self.layers.values() if id(layer.lora_B) in trained]

    def aux_loss(self) -> torch.Tensor:
        """The routers' auxiliary loss of the last forward (zero on the model's device if none)."""
        loss = ROUTERS[self.router].aux_loss(self.routers)
        return loss if loss is not None else next(iter(self.layers.values())).lora_A.new_zeros(())

    def after_step(self, world: World = SINGLE) -> None:
        """Routers' bookkeeping on counts summed over all processes (balancing biases agree)."""
        all_reduce_sum([t for router in self.routers.values() for t in router.step_counts()], world)
        for router in self.routers.values():
            router.after_step()

    def save(self, folder: Path, base_model: str | None = None) -> Path:
        return save_mixture(self, folder, base_model)

    def load(self, folder: Path) -> None:
        """Restore weights and router buffers from a mixture or checkpoint folder."""
        self.load_tensors(load_file(folder / WEIGHTS_FILE), f"'{folder}'")

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


def router_options(router: str, settings: dict | Options | None = None) -> Options:
    """The settings of ``router`` from a mapping (unknown keys fail), its defaults if None."""
    if router not in ROUTERS:
        raise RankwiseError(f"unknown router '{router}': choose one of {', '.join(ROUTERS)}")
    if isinstance(settings, Options):
        return settings
    return ROUTERS[router].options.from_mapping(settings or {}, f"router {router}")


def build_mixture(model: nn.Module, router: str, options: dict | Options | None = None) -> Mixture:
    """Attach fresh experts and routers as ``options`` say (X-LoRA: the given adapters)."""
    options = router_options(router, options)
    policy = ROUTERS[router]
    layers = inject_experts(model, policy.layer_specs(model, options))
    policy.initialise(model, layers, options)
    return assemble(model, layers, router, options)


def assemble(
    model: nn.Module, layers: dict[str, LowRankExperts], router: str, options: Options
) -> Mixture:
    """Give each layer its router and build the head; only the router's choice stays trainable."""
    policy = ROUTERS[router]
    for index, layer in enumerate(layers.values()):
        layer.policy = policy(layer, options, index)
    mixture = Mixture(router, options, layers, policy.head(model, layers, options))
    mixture.head.to(model_device(model))
    model.requires_grad_(False)
    for param in mixture.parameters():
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
        "router_config": {"router": mixture.router, **mixture.options.as_dict()},
        "layers": {
            name: [dataclasses.asdict(spec) for spec in layer.experts]
            for name, layer in mixture.layers.items()
        },
    }
    atomic_file(path / WEIGHTS_FILE, lambda p: save_file(mixture.tensors(), p))
    atomic_file(path / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    return path


def read_mixture_config(folder: str | os.PathLike) -> dict:
    """The parsed ``mixture_config.json`` of a mixture folder, checked for format and version."""
    file = Path(folder) / CONFIG_FILE
    if not file.is_file():
        raise RankwiseError(f"'{folder}' is not a mixture folder: it has no {CONFIG_FILE}")
    saved = json.loads(file.read_text())
    if saved.get("format") != FORMAT or saved.get("version") not in (1, VERSION):
        raise RankwiseError(f"'{file}' is not a {FORMAT} config of version 1 or {VERSION}")
    if saved["version"] == 1:
        saved["router_config"] = upgrade_v1(saved["router_config"])
    return saved


def upgrade_v1(config: dict) -> dict:
    """A version-1 router config (one shared set of keys) as the router's own settings.

    Version 1's ``r`` was the per-expert rank of MoLA and RadarGate and the total rank of SMoRA
    and FlyLoRA; keys the router never read are dropped.
    """
    router = config["router"]
    renamed = {"r": "expert_rank" if router in ("mola", "radargate") else "rank"}
    known = {f for f in ROUTERS[router].options.__dataclass_fields__}
    values = {renamed.get(k, k): v for k, v in config.items() if k != "router"}
    return {"router": router, **{k: v for k, v in values.items() if k in known}}


def load_mixture(model: nn.Module, folder: str | os.PathLike) -> Mixture:
    """Attach a saved mixture to ``model`` (the base it was trained on) and load its weights."""
    saved = read_mixture_config(folder)
    settings = dict(saved["router_config"])
    router = settings.pop("router")
    options = router_options(router, settings)
    specs = {name: [ExpertSpec(**s) for s in specs] for name, specs in saved["layers"].items()}
    mixture = assemble(model, inject_experts(model, specs), router, options)
    mixture.load_tensors(load_file(Path(folder) / WEIGHTS_FILE), f"mixture '{folder}'")
    return mixture

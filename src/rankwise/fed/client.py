"""A client's round: the global state onto the cached base, train()'s loop, the factors back.

No new loop: the client's ``FedAdapter`` is a ``Trainable`` that ``rankwise.train.train`` trains
like any adapter. Before it attaches, the folded pairs of the global state are added to the
targeted base weights (restored exactly afterwards from a copy, so one cached base serves every
client an actor simulates); after training the adapter is taken off again.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from rankwise.adapters import (
    LoraConfig,
    inject_adapter,
    remove_experts,
    save_adapter,
    select_targets,
)
from rankwise.architectures import dense_weight
from rankwise.data import collate
from rankwise.fed.base import ClientUpdate, GlobalState, Method, ModuleState, Scores
from rankwise.fed.config import FedConfig
from rankwise.models import LoadedModel, model_device
from rankwise.train import train
from rankwise.train.distributed import World
from rankwise.train.examples import build_examples, label_tokens
from rankwise.train.loss import summed_loss


class Between(torch.nn.Module):
    """Fed-SB's parametrisation of lora_B as B·R: the stored parameter is R [r, r]."""

    def __init__(self, b: torch.Tensor):
        super().__init__()
        self.register_buffer("b", b)  # [out, r], frozen

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.b @ r  # [out, r]

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return self.b.T @ value  # B has orthonormal columns: Bᵀ (B R) = R


class FedAdapter:
    """The ``Trainable`` of one client round: the global factors (or a fresh adapter) with only
    the method's trained parts as parameters, on the modules and at the ranks ``lora`` gives
    (the first rows of A and columns of B where a rank is below the global one)."""

    def __init__(self, loaded: LoadedModel, lora: LoraConfig, method: Method, state: GlobalState):
        self.model, self.method = loaded.model, method
        self.layers = inject_adapter(self.model, lora)
        self.device = model_device(self.model)
        with torch.no_grad():
            for module, layer in self.layers.items():
                parts = state[module].parts
                if method.restarts() or not parts:
                    continue
                rank = layer.lora_A.shape[0]
                layer.lora_A.copy_(parts["A"][:rank])
                if "R" in parts:
                    parametrize.register_parametrization(
                        layer, "lora_B", Between(parts["B"].to(self.device)), unsafe=True
                    )
                    layer.parametrizations.lora_B.original.copy_(parts["R"])
                else:
                    layer.lora_B.copy_(parts["B"][:, :rank])
                if "A" not in method.trains:
                    layer.lora_A.requires_grad_(False)

    def trained(self, layer) -> dict[str, torch.nn.Parameter]:
        found = {"A": layer.lora_A}
        if parametrize.is_parametrized(layer, "lora_B"):
            found["R"] = layer.parametrizations.lora_B.original
        else:
            found["B"] = layer.lora_B
        return {part: found[part] for part in self.method.trains}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in self.trained(layer).values()]

    def up_factors(self) -> list[torch.nn.Parameter]:
        return [
            self.trained(layer)["B"] for layer in self.layers.values() if "B" in self.trained(layer)
        ]

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def after_step(self, world: World) -> None:
        return None

    def save(self, folder: Path, base_model: str) -> None:
        save_adapter(self.model, folder, base_model=base_model)

    def load(self, folder: Path) -> None:
        raise NotImplementedError("a client round is never resumed: the server resumes rounds")

    def update(self, weight: float) -> ClientUpdate:
        """What this client trained: every part of its factors, detached."""
        parts, scales = {}, {}
        for module, layer in self.layers.items():
            mine = {"A": layer.lora_A.detach().clone(), "B": layer.lora_B.detach().clone()}
            if parametrize.is_parametrized(layer, "lora_B"):
                mine["B"] = layer.parametrizations.lora_B[0].b.clone()
                mine["R"] = layer.parametrizations.lora_B.original.detach().clone()
            parts[module], scales[module] = mine, layer.experts[0].scaling
        return ClientUpdate(parts, scales, weight)


class Folded:
    """The global state's folded pairs added into the base weights, undone on exit."""

    def __init__(self, model: torch.nn.Module, state: GlobalState):
        self.model, self.state, self.saved = model, state, {}

    @torch.no_grad()
    def __enter__(self) -> Folded:
        for module, ms in self.state.items():
            if ms.folded:
                weight = dense_weight(self.model.get_submodule(module))  # [out, in]
                self.saved[module] = weight.clone()
                weight += ms.folded_delta(torch.zeros_like(weight, dtype=torch.float32)).to(weight)
        return self

    @torch.no_grad()
    def __exit__(self, *exc) -> None:
        for module, original in self.saved.items():
            dense_weight(self.model.get_submodule(module)).copy_(original)


def client_config(config: FedConfig, partition_id: int, server_round: int, data: str, out: Path):
    """The config of one local run: the client's data, rank and seed, no validation."""
    return dataclasses.replace(
        config,
        data=data,
        output_dir=str(out),
        r=config.client_rank(partition_id),
        seed=config.seed + 1000 * server_round + partition_id,
        eval_every=0,
        save_every=0,
        keep_last=1,
    )


def local_round(
    loaded: LoadedModel,
    config: FedConfig,
    method: Method,
    state: GlobalState,
    data: str,
    partition_id: int,
    server_round: int,
) -> tuple[ClientUpdate, float]:
    """Train one round on this client's data; returns its update and final train loss."""
    with tempfile.TemporaryDirectory(prefix="rankwise-fed-client-") as folder:
        local = client_config(config, partition_id, server_round, data, Path(folder) / "run")
        scores = module_scores(loaded, local, state, data)
        lora = method.local_lora(local, partition_id, list(state), scores)
        made: list[FedAdapter] = []

        def attach(loaded_model: LoadedModel, _config) -> FedAdapter:
            made.append(FedAdapter(loaded_model, lora, method, state))
            return made[0]

        with Folded(loaded.model, state):
            try:
                result = train(local, attach=attach, loaded=loaded)
                examples = build_examples(data, loaded.tokenizer, local, "train", World())[0]
                update = made[0].update(float(len(examples)))
            finally:
                remove_experts(loaded.model)
                loaded.model.eval()
    return update, result.final_loss


def initial_state(loaded: LoadedModel, config: FedConfig, method: Method) -> GlobalState:
    """Round 0's global state: the adapter init seeded by ``seed`` (B = 0), for every client."""
    torch.manual_seed(config.seed)
    modules = select_targets(loaded.model, config.target_modules)
    layers = inject_adapter(loaded.model, method.global_lora(config, modules))
    state = {}
    for module, layer in layers.items():
        parts = {"A": layer.lora_A.detach().clone(), "B": layer.lora_B.detach().clone()}
        state[module] = ModuleState({} if method.restarts() else parts, layer.experts[0].scaling)
    remove_experts(loaded.model)
    return state


def module_scores(loaded: LoadedModel, config: FedConfig, state: GlobalState, data: str) -> Scores:
    """Each module's squared gradient norm ‖∂L/∂W‖² at the global model (its trained factors
    folded into the base too), measured only when called (hello's Fisher pattern)."""

    def measure() -> dict[str, float]:
        whole = {m: ModuleState({}, ms.scale, ms.whole()) for m, ms in state.items()}
        with Folded(loaded.model, whole):
            grads = gradient_estimate(loaded, config, data, config.hello_fisher_batches)
        return {m: float(g.double().square().sum()) for m, g in grads.items()}

    return measure


def gradient_estimate(
    loaded: LoadedModel, config: FedConfig, data: str, batches: int
) -> dict[str, torch.Tensor]:
    """The mean loss gradient of every targeted W ([out, in]) over a few batches (Fed-SB's init)."""
    model = loaded.model
    modules = select_targets(model, config.target_modules)
    weights = {m: dense_weight(model.get_submodule(m)) for m in modules}
    examples = build_examples(data, loaded.tokenizer, config, "train", World())[0]
    chosen = examples[: batches * config.batch_size]
    device = model_device(model)
    for m in modules:
        model.get_submodule(m).weight.requires_grad_(True)
    try:
        for start in range(0, len(chosen), config.batch_size):
            chunk = chosen[start : start + config.batch_size]
            batch = {
                k: v.to(device) for k, v in collate(chunk, loaded.tokenizer.pad_token_id).items()
            }
            (summed_loss(model, batch) / max(label_tokens(chosen), 1)).backward()
        grads = {}
        for m in modules:
            grad = model.get_submodule(m).weight.grad
            grads[m] = (grad.T if grad.shape != weights[m].shape else grad).float().clone()
    finally:
        for m in modules:
            model.get_submodule(m).weight.requires_grad_(False)
            model.get_submodule(m).weight.grad = None
    return grads

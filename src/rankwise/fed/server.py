"""The server's side of a run, without Flower: state, aggregation, evaluation, checkpoints.

The Flower strategy (``rankwise.fed.app``) calls ``FedServer``: ``downlink`` for what a round
sends, ``finish_round`` with the replies. Every round ends with a checkpoint written atomically,
``rounds/round-000N`` (the global adapter in PEFT's format, the exact state as safetensors,
``round.json``), and ``adapter/`` refreshed; ``--resume`` continues after the last one. The
global adapter stacks every folded pair and the trained factors with their scale folded into B
(alpha = rank, so s = 1): an ordinary PEFT LoRA adapter equal to the global model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rankwise.adapters import LoraWeights, attach_adapters, remove_experts, write_adapter
from rankwise.atomic import atomic_folder
from rankwise.data import load_dataset_spec
from rankwise.errors import RankwiseError
from rankwise.evaluate.accuracy import exact_match
from rankwise.fed.base import (
    ClientUpdate,
    GlobalState,
    aggregation_error,
    normalised,
    state_from_flat,
)
from rankwise.fed.config import FedConfig
from rankwise.fed.metrics import plot_rounds
from rankwise.fed.registry import get_method
from rankwise.models import LoadedModel
from rankwise.train.distributed import World
from rankwise.train.examples import build_examples, validation_spec
from rankwise.train.loss import validation_loss

ROUND_FILE = "round.json"
STATE_FILE = "state.safetensors"


def export_adapter(state: GlobalState, base_model: str | None) -> LoraWeights | None:
    """The global model's update as one PEFT adapter (None before anything was trained)."""
    factors, alphas = {}, {}
    for module, ms in state.items():
        pairs = ms.whole()
        if pairs:
            a, b = zip(*pairs, strict=True)
            factors[module] = (torch.cat(a), torch.cat(b, dim=1))
            alphas[module] = float(factors[module][0].shape[0])  # s = alpha / rank = 1
    return LoraWeights(factors, alphas, base_model=base_model) if factors else None


def flat_state(state: GlobalState) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in get_method("fedit").downlink(state).items()}


class FedServer:
    """One run's server: the global state, each round's aggregation and bookkeeping."""

    def __init__(self, config: FedConfig, loaded: LoadedModel, resume: bool = False):
        self.config, self.loaded, self.method = config, loaded, get_method(config.method)
        self.output = config.output
        self.rounds_dir = self.output / "rounds"
        done = self.finished_rounds()
        if resume and not done:
            raise RankwiseError(f"--resume: no finished round under '{self.rounds_dir}'")
        if not resume and done:
            raise RankwiseError(
                f"'{self.output}' already holds rounds: pass --resume to continue, or a new "
                "output_dir"
            )
        self.output.mkdir(parents=True, exist_ok=True)
        self.scales: dict[str, float] = {}
        self.state: GlobalState = {}
        self.round = 0
        if resume:
            self.load(done[-1])
        spec = validation_spec(config)
        self.val_examples = (
            build_examples(spec, loaded.tokenizer, config, "validation", World())[0] if spec else []
        )
        self.eval_records = []
        if config.eval_records and spec and spec.startswith("task:"):
            self.eval_records = load_dataset_spec(
                spec, split="validation", n=config.eval_records
            ).records
        self.metrics_path = self.output / "metrics.jsonl"
        if not resume:
            self.metrics_path.write_text("")
        else:  # forget lines of rounds after the resumed one
            kept = [
                line
                for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["round"] <= self.round
            ]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def set_state(self, state: GlobalState) -> None:
        self.state = state
        self.scales = {m: s.scale for m, s in state.items()}

    def finished_rounds(self) -> list[Path]:
        if not self.rounds_dir.is_dir():
            return []
        return sorted(p for p in self.rounds_dir.glob("round-*") if (p / ROUND_FILE).is_file())

    def load(self, folder: Path) -> None:
        saved = json.loads((folder / ROUND_FILE).read_text())
        changed = sorted(
            k
            for k, v in saved["config"].items()
            if k not in ("rounds", "output_dir", "device", "round_timeout")
            and getattr(self.config, k) != v
        )
        if changed:
            raise RankwiseError(
                f"cannot resume: the config differs from the checkpoint's in {changed}"
            )
        self.round = saved["round"]
        self.set_state(state_from_flat(load_file(folder / STATE_FILE), saved["scales"]))

    def finish_round(
        self,
        server_round: int,
        updates: list[ClientUpdate],
        losses: list[float],
        traffic: dict[str, int],
    ) -> dict:
        """Aggregate the replies, evaluate, checkpoint; returns the round's metrics line."""
        if len(updates) < self.config.needed_replies:
            raise RankwiseError(
                f"round {server_round}: {len(updates)} replies, fewer than the "
                f"{self.config.needed_replies} it needs (min_clients)"
            )
        started = time.perf_counter()
        weights = normalised([u.weight for u in updates])
        new = self.method.aggregate(self.state, updates, weights)
        error = aggregation_error(self.state, new, updates, weights)
        self.state, self.round = new, server_round
        line = {
            "round": server_round,
            "clients": len(updates),
            "client_losses": losses,
            **traffic,
            "aggregation_error": error,
            **self.evaluate(),
            "aggregate_seconds": time.perf_counter() - started,
        }
        self.save(line)
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(line) + "\n")
        plot_rounds(self.metrics_path, self.output / "rounds.png")
        return line

    def evaluate(self) -> dict:
        weights = export_adapter(self.state, self.loaded.name)
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        if weights is not None:
            attach_adapters(model, [weights])
        try:
            found = {}
            if self.val_examples:
                found["val_loss"] = validation_loss(
                    model,
                    self.val_examples,
                    self.config.batch_size,
                    tokenizer.pad_token_id,
                    World(),
                )
            if self.eval_records:
                tallies = exact_match(model, tokenizer, self.eval_records, self.config.batch_size)
                found["exact_match"] = sum(t["correct"] for t in tallies.values()) / sum(
                    t["total"] for t in tallies.values()
                )
                found["exact_match_per_task"] = {k: t["accuracy"] for k, t in tallies.items()}
        finally:
            if weights is not None:
                remove_experts(model)
        return found

    def save(self, line: dict) -> None:
        weights = export_adapter(self.state, self.loaded.name)

        def write(folder: Path) -> None:
            save_file(flat_state(self.state), folder / STATE_FILE)
            if weights is not None:
                write_adapter(weights, folder / "adapter")
            record = {
                "round": self.round,
                "method": self.method.name,
                "scales": self.scales,
                "config": self.config.as_dict(),
                "metrics": line,
            }
            (folder / ROUND_FILE).write_text(json.dumps(record, indent=2))

        atomic_folder(self.rounds_dir / f"round-{self.round:04d}", write)
        if weights is not None:
            atomic_folder(self.output / "adapter", lambda folder: write_adapter(weights, folder))
        for old in self.finished_rounds()[: -self.config.keep_last]:
            shutil.rmtree(old)

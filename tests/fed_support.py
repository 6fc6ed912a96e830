"""What the federated tests share: word data for the tiny model, its config, in-process rounds."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rankwise.fed.config import FedConfig
from rankwise.fed.sequential import run_rounds

__all__ = ["run_rounds", "tiny_config", "word_data"]


def word_data(path: Path, n: int, seed: int) -> str:
    """Prompt/completion records in the tiny tokenizer's words: copy the first word."""
    rng = random.Random(seed)
    with path.open("w") as file:
        for _ in range(n):
            words = [f"w{rng.randrange(3, 60)}" for _ in range(4)]
            file.write(json.dumps({"prompt": " ".join(words), "completion": words[0]}) + "\n")
    return str(path)


def tiny_config(tmp_path: Path, model_dir: Path, **values) -> FedConfig:
    settings = {
        "model": str(model_dir),
        "data": word_data(tmp_path / "train.jsonl", 24, 0),
        "eval_data": word_data(tmp_path / "val.jsonl", 8, 1),
        "output_dir": str(tmp_path / "run"),
        "r": 2,
        "lora_alpha": 4.0,
        "max_steps": 2,
        "batch_size": 4,
        "warmup_steps": 0,
        "lr": 1e-2,
        "seq_len": 16,
        "log_every": 1,
        "clients": 2,
        "rounds": 2,
    }
    return FedConfig.from_mapping(settings | values)

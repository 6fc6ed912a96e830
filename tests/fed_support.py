"""What the federated tests share: word data for the tiny model and rounds run in-process."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rankwise.fed.client import gradient_estimate, initial_state, local_round
from rankwise.fed.config import FedConfig
from rankwise.fed.fedsb import fedsb_init
from rankwise.fed.server import FedServer


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


def run_rounds(
    server: FedServer, datas: list[str], until: int, lost: type[Exception] | tuple = ()
) -> list[dict]:
    """Rounds after the server's last one up to ``until``, every client trained in turn; a
    client raising ``lost`` is a failed reply (as Flower counts a ClientApp that raised)."""
    config, loaded, method = server.config, server.loaded, server.method
    if server.round == 0:
        state = initial_state(loaded, config, method)
        if method.name == "fedsb":
            grads = [gradient_estimate(loaded, config, d, config.fedsb_init_batches) for d in datas]
            scale = next(iter(state.values())).scale
            state = fedsb_init(grads, [1.0] * len(datas), config.r, scale)
        server.set_state(state)
    lines = []
    for number in range(server.round + 1, until + 1):
        replies = []
        for k, data in enumerate(datas):
            try:
                replies.append(local_round(loaded, config, method, server.state, data, k, number))
            except lost:
                continue
        updates, losses = [u for u, _ in replies], [loss for _, loss in replies]
        traffic = {
            "uplink_bytes": 0,
            "downlink_bytes": 0,
            "failed_replies": len(datas) - len(replies),
        }
        lines.append(server.finish_round(number, updates, losses, traffic))
    return lines

"""Training LoRA adapters: the config, the loop, checkpoints, schedules, distributed helpers."""

from rankwise.train.config import TrainConfig, from_mapping
from rankwise.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "from_mapping", "train"]

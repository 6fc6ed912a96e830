"""Training: the configs, the loop and what it trains, checkpoints, schedules, data parallelism."""

from rankwise.train.config import RunConfig, TrainConfig
from rankwise.train.loop import TrainResult, train
from rankwise.train.trainable import LoraAdapter, Trainable

__all__ = ["LoraAdapter", "RunConfig", "TrainConfig", "TrainResult", "Trainable", "train"]

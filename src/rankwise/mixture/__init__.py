"""Training and inspecting mixtures of LoRA experts (the routers live in ``rankwise.routers``)."""

from rankwise.mixture.train import MixConfig, train_mixture

__all__ = ["MixConfig", "train_mixture"]

"""Mixtures of LoRA experts on a model: building, saving, loading, training and inspecting.

The gate policies themselves (one per paper) live in ``rankwise.routers``.
"""

from rankwise.mixture.mixture import (
    Mixture,
    build_mixture,
    load_mixture,
    read_mixture_config,
    router_options,
    save_mixture,
)
from rankwise.mixture.train import MixConfig, mix_config, train_mixture

__all__ = [
    "MixConfig",
    "Mixture",
    "build_mixture",
    "load_mixture",
    "mix_config",
    "read_mixture_config",
    "router_options",
    "save_mixture",
    "train_mixture",
]

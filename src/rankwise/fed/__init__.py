"""Federated LoRA: aggregation methods as pure functions (no Flower) and the Flower app.

Everything here but ``rankwise.fed.app`` and ``rankwise.fed.simulation`` works without Flower;
those import ``flwr`` lazily and say in one line how to install it (``rankwise[fed]``).
"""

from rankwise.fed.base import (
    ClientUpdate,
    GlobalState,
    Method,
    ModuleState,
    aggregation_error,
    normalised,
    payload_bytes,
)
from rankwise.fed.registry import METHODS, get_method

__all__ = [
    "METHODS",
    "ClientUpdate",
    "GlobalState",
    "Method",
    "ModuleState",
    "aggregation_error",
    "get_method",
    "normalised",
    "payload_bytes",
]

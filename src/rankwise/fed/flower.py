"""Flower is an extra: the one place that says how to install it when a ``fed`` verb needs it."""

from __future__ import annotations

import importlib.util

from rankwise.errors import RankwiseError

INSTALL = "pip install 'rankwise[fed]'"
MODULES = {"flower": "flwr", "datasets": "flwr_datasets", "simulation": "ray"}


def need_flower(part: str = "flower") -> None:
    """Raise one line naming the install command if Flower (or its part) is missing."""
    if importlib.util.find_spec(MODULES[part]) is None:
        raise RankwiseError(
            f"federated training needs Flower ({MODULES[part]} is not installed): {INSTALL}"
        )

"""Swapping modules of a model by qualified name: one explicit call that returns what it replaced.

The adapters package injects ``LowRankExperts`` the same way; this generic form lives in serve/
for now because the slot layers are its only other user.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn


def swap_modules(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module at its qualified name in ``model``; returns the replaced ones by name."""
    replaced = {}
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        replaced[name] = getattr(parent, child)
        setattr(parent, child, module)
    return replaced


@contextmanager
def swapped(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """``modules`` in place for the duration of the block, then what they replaced again."""
    replaced = swap_modules(model, modules)
    try:
        yield
    finally:
        swap_modules(model, replaced)

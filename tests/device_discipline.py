"""Device discipline checked on a CPU-only machine: what a GPU run needs, proven without one.

Two tools, used by the training, serving and compression tests:

- ``FactoryRecorder(folder)`` records every tensor factory (what ``with torch.device(d)``
  redirects, ``nn.Linear(...)`` included) called from code under ``folder`` without naming
  its device, and every ``.cpu()`` call there. On CUDA such a tensor would land on the CPU.
- ``on_meta_by_default(fn)`` runs ``fn`` with torch's default device set to meta: a tensor made
  anywhere (ours or transformers') without a device becomes a meta tensor, and the step fails
  as soon as it meets the model's real tensors or is read.

What neither can show: CUDA-only behaviour (kernels, streams, bf16 numerics).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors  # what `with torch.device(d)` redirects

TORCH = Path(torch.__file__).parent
FACTORIES = _device_constructors()


def caller() -> tuple[Path, int] | None:
    """(file, line) of the innermost frame outside torch and this module: who called torch."""
    frame = sys._getframe(1)
    while frame is not None and (
        Path(frame.f_code.co_filename).is_relative_to(TORCH) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return None if frame is None else (Path(frame.f_code.co_filename), frame.f_lineno)


class FactoryRecorder(TorchFunctionMode):
    """Records factories without a device, and moves to the CPU, made by code under ``folder``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.events: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            self.note(f"torch.{func.__name__} without device=")
        elif func is torch.Tensor.cpu:
            self.note(".cpu()")
        return func(*args, **kwargs)

    def note(self, what: str) -> None:
        where = caller()
        if where is not None and where[0].is_relative_to(self.folder):
            self.events.append(f"{what} at {where[0].name}:{where[1]}")


def on_meta_by_default(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with the meta device as torch's default (see the module docstring)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.device("meta"):
            return fn(*args, **kwargs)

    return run

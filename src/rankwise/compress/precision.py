"""Where compression does its arithmetic, and in which dtype.

Calibration statistics are accumulated on the device the activations live on (the model's), in
float64 where the device has it. MPS has no float64: there they are accumulated in float32 on
the device (the per-batch sums are float32 matrix products either way) and moved, explicitly and
only then, to the CPU in float64 for the factorisations (SVD, Cholesky, eigendecompositions),
which MPS also lacks. On CPU and CUDA everything stays on the model's device in float64. The
results are copied into modules built on the model's device in the model's dtype.
"""

from __future__ import annotations

import torch

NO_FLOAT64 = ("mps",)  # device types without float64 tensors


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype calibration sums use on ``device``: float64, or float32 where it has none."""
    return torch.float32 if device.type in NO_FLOAT64 else torch.float64


def factor_device(device: torch.device) -> torch.device:
    """Where float64 linear algebra on tensors from ``device`` runs: there, or on the CPU."""
    return torch.device("cpu") if device.type in NO_FLOAT64 else device


def for_factoring(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, as float64 on its factorisation device (a no-op for CPU statistics)."""
    return tensor.detach().to(device=factor_device(tensor.device), dtype=torch.float64)

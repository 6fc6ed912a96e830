"""The compressor contract, the per-layer driver and helpers the methods share.

A method is a dataclass subclass of ``Compressor`` in its own file, registered by name in
``rankwise.compress.registry``; its settings are ``rankwise.options`` fields, so a command line
can list them. It checks the model before any calibration (``check_model``), declares the
calibration statistics it needs and rewrites one decoder layer at a time, in place; the ratio is
the fraction of that layer's linear-layer parameters to remove.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from tqdm import tqdm

from rankwise.architectures import decoder_blocks, is_linear, shared_input
from rankwise.compress.attention import A3Attention
from rankwise.compress.calibration import Statistics
from rankwise.compress.lowrank import LowRankLinear
from rankwise.errors import RankwiseError
from rankwise.options import Options


@dataclasses.dataclass
class Compressor(Options):
    """Base class of compression methods; every hook raises until a method overrides it."""

    name: ClassVar[str] = ""
    # the one ratio a method removes by construction (2:4 pruning: 0.5); None: any ratio
    fixed_ratio: ClassVar[float | None] = None

    def check_model(self, model: nn.Module) -> None:
        """Raise ``RankwiseError`` if the method cannot compress ``model``: runs before calibrating.

        Everything that can be told from the model alone (architecture, layer types, shapes)
        belongs here, so a bad pairing fails in seconds instead of after the calibration pass.
        """
        raise NotImplementedError(f"{type(self).__name__} does not check models")

    def needs(self, model: nn.Module) -> dict[str, set[str]]:
        """{module name: statistic kinds} whose inputs the method calibrates on."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its statistics")

    def compress_layer(self, model: nn.Module, index: int, ratio: float, stats: Statistics) -> None:
        """Rewrite decoder layer ``index`` in place, removing a fraction ``ratio`` of parameters."""
        raise NotImplementedError(f"{type(self).__name__} does not compress layers")

    def settings(self) -> dict:
        """The method's name and options, as the output folder records them."""
        return {"method": self.name, **self.as_dict()}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the model's decoder layers (``layers.N`` or ``h.N``)."""
    try:
        return decoder_blocks(model)
    except LookupError as err:
        raise RankwiseError(f"nothing to compress: {err}") from err


def input_key(model: nn.Module, name: str) -> str:
    """The module whose input statistics stand for ``name``'s input (k/v read q's input, ...)."""
    return shared_input(model.config, name)


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The linear maps (``nn.Linear``, GPT-2's ``Conv1D``) of one decoder layer, by name in it."""
    return {n: m for n, m in layer.named_modules() if is_linear(m)}


def layer_ratios(ratio: float | Sequence[float], count: int) -> list[float]:
    """One ratio per decoder layer from a single ratio or a per-layer list (mixed rank)."""
    ratios = [float(ratio)] * count if isinstance(ratio, int | float) else list(ratio)
    if len(ratios) != count:
        raise RankwiseError(f"got {len(ratios)} per-layer ratios for a model of {count} layers")
    if any(not 0.0 <= r < 1.0 for r in ratios):
        raise RankwiseError("compression ratios must lie in [0, 1)")
    return ratios


def keep_count(total: int, ratio: float) -> int:
    """How many of ``total`` channels (pairs, ranks) to keep when removing ``ratio`` of them."""
    return max(1, round((1.0 - ratio) * total))


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """gram + damping·mean(diag)·I: keeps a second-moment matrix safely positive definite."""
    shift = damping * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    return gram + shift * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def check_compressible(
    model: nn.Module, compressor: Compressor, ratio: float | Sequence[float]
) -> list[float]:
    """The per-layer ratios, once everything the model alone can tell has been checked.

    Runs before calibration: the model is not compressed yet, the ratios fit its layers, and
    the method accepts it (``Compressor.check_model``).
    """
    if any(isinstance(m, LowRankLinear | A3Attention) for m in model.modules()):
        raise RankwiseError("the model is already compressed; compress the original model")
    _, layers = decoder_layers(model)
    ratios = layer_ratios(ratio, len(layers))
    fixed = compressor.fixed_ratio
    if fixed is not None and any(r != fixed for r in ratios):
        raise RankwiseError(f"{compressor.name} removes exactly {fixed}: give --ratio {fixed}")
    compressor.check_model(model)
    return ratios


def compress_layers(
    model: nn.Module, compressor: Compressor, ratios: Sequence[float], stats: Statistics
) -> None:
    """Compress decoder layer i of a checked model with ``ratios[i]``, showing progress."""
    for index in tqdm(range(len(ratios)), desc=f"compress {compressor.name}", unit="layer"):
        compressor.compress_layer(model, index, ratios[index], stats)


def compress_model(
    model: nn.Module,
    compressor: Compressor,
    ratio: float | Sequence[float],
    stats: Statistics,
) -> None:
    """Check, then compress every decoder layer of ``model`` in place with ready statistics."""
    compress_layers(model, compressor, check_compressible(model, compressor, ratio), stats)

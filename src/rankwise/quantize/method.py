"""The contract of a ``rankwise quantize`` method, and plain NF-k (no low-rank part)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rankwise.options import Options
from rankwise.quantize.base import BaseQuantizer, quantize_model
from rankwise.quantize.nfk import NFkLinear

# module name -> (A [r, in], B [out, r]): a low-rank part to start an adapter from
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class QuantizeMethod(Options):
    """A method quantises a model's linear layers in place; some return a low-rank part."""

    name: ClassVar[str]

    def quantize(
        self, model: nn.Module, block: int, input_ids: torch.Tensor | None = None
    ) -> Factors:
        """Quantise ``model`` in place; the factors of its initial adapter (empty if none).

        ``input_ids`` are the calibration blocks ``calibration`` asked for (None if it did not).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement quantize")

    def calibration(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor | None:
        """Calibration blocks (samples, seq_len) the method needs, or None (the default)."""
        return None

    def adapter_alpha(self) -> float:
        """The lora_alpha the returned factors assume (their B is divided by alpha / r)."""
        raise NotImplementedError(f"{type(self).__name__} has no low-rank part")


@dataclass
class PlainNF(QuantizeMethod):
    """Round every block to the nearest NF-k level (QLoRA's data type, arXiv 2305.14314)."""

    bits: ClassVar[int]

    def quantize(
        self, model: nn.Module, block: int, input_ids: torch.Tensor | None = None
    ) -> Factors:
        quantize_model(model, BaseQuantizer(NFkLinear.from_weight, self.bits), block)
        return {}


def plain(bits: int) -> type[PlainNF]:
    """The plain NF-``bits`` method class (``nf2``, ``nf3``, ``nf4``, ``nf8``)."""
    doc = f"NF{bits}: every block rounded to the nearest of 2^{bits} NormalFloat levels."
    return type(f"NF{bits}", (PlainNF,), {"bits": bits, "name": f"nf{bits}", "__doc__": doc})

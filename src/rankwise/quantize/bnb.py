"""Frozen bases quantised by bitsandbytes: NF4 and FP4 (QLoRA, arXiv 2305.14314) and int8.

QLoRA keeps the base in 4 bits (blockwise absmax, NormalFloat or FP4 codes, the absmax values
themselves quantised to 8 bits in blocks of 256: "double quantisation", about 4.13 bits per
weight at block 64) and trains the LoRA in higher precision on top. rankwise wraps
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` so that the adapter layer sees one more frozen
linear map, and saved adapters are ordinary PEFT adapters (PEFT wraps these same classes).

Why the wrapper: on CPUs that bitsandbytes takes for AVX512-BF16 ones, ``Linear4bit``'s first
no-grad eval forward repacks the weight into a CPU inference layout; after that, a training
forward never sends a gradient to the layer's input (measured: no error without a bias, a
RuntimeError with one). ``Frozen4bit`` turns the repacking off and calls the 4-bit matmul
itself, so train -> eval -> train gives the gradients of the dequantised weight
(``tests/test_quantize_bnb.py``).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from rankwise.architectures import QuantizedLinear
from rankwise.errors import RankwiseError

NEEDS_BNB = ("nf4", "fp4", "int8")
WITHOUT_BNB = "nf2, nf3, nf4 and nf8 through `rankwise quantize --method nfK` (rankwise's own)"


def bitsandbytes():
    """The bitsandbytes module, or one line saying it is missing and what still works."""
    # Its CPU backend logs a warning at import when the optional `kernels` package is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except (ImportError, RuntimeError, OSError) as err:
        raise RankwiseError(
            f"--quantize {'/'.join(NEEDS_BNB)} needs bitsandbytes (pip install "
            f"'rankwise[quant]'), which is unavailable here ({type(err).__name__}); "
            f"{WITHOUT_BNB} still work"
        ) from err
    return bitsandbytes


@functools.cache
def frozen_classes() -> tuple[type, type]:
    """(Frozen4bit, Frozen8bit), defined once bitsandbytes is known to import."""
    bnb = bitsandbytes()

    class Frozen4bit(bnb.nn.Linear4bit, QuantizedLinear):
        """``Linear4bit`` that never repacks for CPU inference and takes x's dtype to compute."""

        def __init__(self, out_features: int, in_features: int, quant_type: str):
            super().__init__(
                in_features, out_features, bias=False, quant_type=quant_type, device="meta"
            )
            self.method = quant_type
            self.support_avx512bf16_for_cpu = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            state = self.weight.quant_state
            b = None if self.bias is None else self.bias.to(x.dtype)
            return bnb.matmul_4bit(x, self.weight.t(), quant_state=state, bias=b)

        def dequantized(self) -> torch.Tensor:
            return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state).float()

        def storage_bytes(self) -> int:
            state = self.weight.quant_state
            extra = [state.absmax, state.code]
            if state.nested:
                extra += [state.state2.absmax, state.state2.code]
            return tensor_bytes(self.weight.data, *extra)

    class Frozen8bit(bnb.nn.Linear8bitLt, QuantizedLinear):
        """LLM.int8's storage without its fp16 outlier path; ``block`` does not apply."""

        method = "int8"

        def dequantized(self) -> torch.Tensor:
            return self.weight.data.float() * (self.weight.SCB.float()[:, None] / 127)

        def storage_bytes(self) -> int:
            return tensor_bytes(self.weight.data, self.weight.SCB)

    return Frozen4bit, Frozen8bit


def make_4bit(weight: torch.Tensor, bias: torch.Tensor | None, kind: str, block: int) -> nn.Module:
    """A ``Frozen4bit`` holding ``weight`` ([out, in]) quantised on its own device."""
    bnb = bitsandbytes()
    out_features, in_features = weight.shape
    layer = frozen_classes()[0](out_features, in_features, kind)
    layer.weight = bnb.nn.Params4bit(
        weight.detach().contiguous(),
        requires_grad=False,
        blocksize=block,
        compress_statistics=True,  # double quantisation of the absmax values
        quant_type=kind,
        module=layer,
    )
    layer.weight._quantize(weight.device)
    layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
    return layer


def make_int8(weight: torch.Tensor, bias: torch.Tensor | None, kind: str, block: int) -> nn.Module:
    """A ``Linear8bitLt`` with row-wise absmax int8 codes (no outlier columns: threshold 0)."""
    out_features, in_features = weight.shape
    layer = frozen_classes()[1](
        in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=0.0
    )
    state = {"weight": weight.detach().float().cpu()}
    if bias is not None:
        state["bias"] = bias.detach().cpu()
    layer.load_state_dict(state)
    layer = layer.to(weight.device)
    layer.requires_grad_(False)
    return layer


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)

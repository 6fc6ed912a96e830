"""NF-k: QLoRA's NormalFloat data type for any k bits, blockwise, double quantised, bit-packed.

QLoRA (arXiv 2305.14314) builds NF4 from quantiles of N(0, 1): 2^(k-1) levels on the positive
side and 2^(k-1) - 1 on the negative side, both ends at the quantile offset
delta = (1 - 1/(2(2^k - 1)) + 1 - 1/(2 * 2^k)) / 2 (0.9677 for k = 4), plus an exact zero,
scaled to [-1, 1]. The same construction gives NF2, NF3 and NF8 here; for k = 4 it is exactly
bitsandbytes' NF4 table (a test). Weights are cut into blocks of ``block`` consecutive values of
a row, each divided by its absmax and rounded to the nearest level.

Double quantisation (the paper's choice left open: it quantises the fp32 absmax values with 8-bit
floats in blocks of 256 after subtracting their mean). Here: the mean is subtracted, then each
block of 256 is linearly quantised to int8 by its own absmax. Linear int8 is simpler to read and,
measured on SmolLM2, adds no visible error over fp32 absmax (the absmax values of a block vary
little). Cost: k + 8/block + 32/(256 block) bits per weight (4.127 for NF4 at block 64).

Codes are packed k bits at a time, most significant bit first, into bytes, so NF3 takes 3 bits.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from rankwise.architectures import QuantizedLinear

DOUBLE_BLOCK = 256  # absmax values per block of the second quantisation


def normal_float(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 2^bits NormalFloat levels in [-1, 1], ascending (float32), on ``device``."""
    return host_levels(bits).to(device)


@functools.cache
def host_levels(bits: int) -> torch.Tensor:
    """``normal_float`` built once per width on the host (every forward dequantises with it)."""
    half = 2 ** (bits - 1)
    delta = 0.5 * (1 - 1 / (2 * (2**bits - 1)) + 1 - 1 / (2 * 2**bits))
    host = {"dtype": torch.float64, "device": "cpu"}
    normal = torch.distributions.Normal(torch.tensor(0.0, **host), torch.tensor(1.0, **host))
    positive = normal.icdf(torch.linspace(delta, 0.5, half + 1, **host)[:-1])
    negative = -normal.icdf(torch.linspace(delta, 0.5, half, **host)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, **host)])
    return (levels / levels.abs().max()).sort().values.float()


def nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ascending ``levels``) for every value, as uint8."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(values, midpoints).to(torch.uint8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (< 2^bits, count * bits divisible by 8) packed into bytes, high bit first."""
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device, dtype=torch.uint8)
    planes = (codes.reshape(-1, 1) >> shifts) & 1  # (n, bits)
    weights = 2 ** torch.arange(7, -1, -1, device=codes.device, dtype=torch.int32)
    return (planes.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack``: ``count`` codes as int64 (for indexing the levels).

    Every forward and backward of a quantised layer runs this, so it reads whole fields, not
    bits: a word of bits/gcd(bits, 8) bytes (one byte for k = 2, 4, 8; three for NF3) holds
    8/gcd(bits, 8) codes, cut out of the big-endian word by shifts.
    """
    common = math.gcd(bits, 8)
    width, fields = bits // common, 8 // common
    grouped = nn.functional.pad(packed, (0, -len(packed) % width)).view(-1, width).long()
    word = grouped[:, 0]
    for column in range(1, width):  # at most 7 bytes: the word fits int64 without its sign
        word = (word << 8) | grouped[:, column]
    shifts = bits * torch.arange(fields - 1, -1, -1, device=packed.device)
    return ((word[:, None] >> shifts) & (2**bits - 1)).flatten()[:count]


def quantize_absmax(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Double quantisation: (absmax - mean) as int8 per block of 256, with fp32 scales."""
    mean = absmax.mean()
    centred = absmax - mean
    padded = nn.functional.pad(centred, (0, -len(centred) % DOUBLE_BLOCK)).view(-1, DOUBLE_BLOCK)
    scale = padded.abs().amax(1).clamp_min(1e-12) / 127
    codes = (padded / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {
        "absmax_codes": codes.flatten()[: len(absmax)],
        "absmax_scale": scale,
        "absmax_mean": mean,
    }


def dequantize_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    codes = state["absmax_codes"].float()
    scale = state["absmax_scale"].repeat_interleave(DOUBLE_BLOCK)[: len(codes)]
    return codes * scale + state["absmax_mean"]


def quantize_weight(weight: torch.Tensor, bits: int, block: int) -> dict[str, torch.Tensor]:
    """The stored tensors of ``weight`` ([out, in], in divisible by ``block``) in NF-``bits``."""
    blocks = weight.detach().float().reshape(-1, block)  # (out * in / block, block)
    absmax = blocks.abs().amax(1).clamp_min(1e-12)
    state = quantize_absmax(absmax)
    scale = dequantize_absmax(state).clamp_min(1e-12)  # round with the scales stored
    levels = normal_float(bits, weight.device)
    codes = nearest(blocks / scale[:, None], levels)
    return {"codes": pack(codes, bits), **state}


def storage_bits(out_features: int, in_features: int, bits: int, block: int) -> int:
    """Bits an [out, in] weight takes in NF-``bits``: codes, int8 absmax, fp32 scales and mean."""
    blocks = out_features * in_features // block
    return out_features * in_features * bits + 8 * blocks + 32 * -(-blocks // DOUBLE_BLOCK) + 32


def dequantize_weight(
    state: dict[str, torch.Tensor], bits: int, shape: tuple[int, int]
) -> torch.Tensor:
    """The float32 weight [out, in] that stored NF-``bits`` tensors stand for."""
    out_features, in_features = shape
    codes = unpack(state["codes"], bits, out_features * in_features)
    absmax = dequantize_absmax(state)
    levels = normal_float(bits, codes.device)
    blocks = levels[codes].view(len(absmax), -1) * absmax[:, None]
    return blocks.view(out_features, in_features)


class DequantizedMatmul(torch.autograd.Function):
    """x W^T with W dequantised in forward and again in backward (never kept between them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NFkLinear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized().to(x.dtype).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized().to(grad.dtype), None


class NFkLinear(QuantizedLinear):
    """A frozen linear map stored in NF-k: packed codes (``weight``), double-quantised absmax."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        block: int,
        bias: bool,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block, self.method = bits, block, f"nf{bits}"
        blocks = in_features * out_features // block
        groups = -(-blocks // DOUBLE_BLOCK)
        packed = blocks * block * bits // 8
        self.register_buffer("weight", torch.zeros(packed, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_codes", torch.zeros(blocks, dtype=torch.int8, device=device))
        self.register_buffer("absmax_scale", torch.zeros(groups, device=device))
        self.register_buffer("absmax_mean", torch.zeros((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), False) if bias else None

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, block: int
    ) -> NFkLinear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bits, block, bias is not None, weight.device)
        layer.load_state(quantize_weight(weight, bits, block))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "codes": self.weight,
            "absmax_codes": self.absmax_codes,
            "absmax_scale": self.absmax_scale,
            "absmax_mean": self.absmax_mean,
        }

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, target in self.state().items():
            target.copy_(state[name])

    def dequantized(self) -> torch.Tensor:
        return dequantize_weight(self.state(), self.bits, (self.out_features, self.in_features))

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, block={self.block}"
        )

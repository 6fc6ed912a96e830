"""Quantised frozen bases and the low-rank parts that close their gap (the quantize pillar).

``BASES`` are the ``--quantize`` choices every model-loading verb takes: bitsandbytes' NF4, FP4
and int8 (QLoRA's path, ``bnb.py``) and rankwise's own NF-k for the widths bitsandbytes lacks
(``nfk.py``). See docs/quantization.md.
"""

from __future__ import annotations

from rankwise.quantize.base import (
    BaseQuantizer,
    WeightReport,
    check_blocks,
    quantizable,
    quantize_model,
    weight_report,
)
from rankwise.quantize.bnb import make_4bit, make_int8
from rankwise.quantize.nfk import NFkLinear, normal_float

BASES: dict[str, BaseQuantizer] = {
    "nf4": BaseQuantizer(make_4bit, "nf4"),
    "fp4": BaseQuantizer(make_4bit, "fp4"),
    "int8": BaseQuantizer(make_int8, "int8", blockwise=False),
    "nf2": BaseQuantizer(NFkLinear.from_weight, 2),
    "nf3": BaseQuantizer(NFkLinear.from_weight, 3),
    "nf8": BaseQuantizer(NFkLinear.from_weight, 8),
}

__all__ = [
    "BASES",
    "BaseQuantizer",
    "NFkLinear",
    "WeightReport",
    "check_blocks",
    "normal_float",
    "quantizable",
    "quantize_model",
    "weight_report",
]

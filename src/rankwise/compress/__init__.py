"""Post-training low-rank compression of the base model: SVD, ASVD, SVD-LLM and A³.

record = compress(model, tokenizer, "a3", 0.2)      # in place; calibrates when needed
save_compressed(model, tokenizer, "out/", record)     # load_compressed("out/") rebuilds it
"""

from rankwise.compress.attention import A3Attention
from rankwise.compress.base import Compressor, compress_model
from rankwise.compress.calibration import (
    Calibration,
    Statistics,
    calibration_data,
    collect_statistics,
    merge_needs,
)
from rankwise.compress.costs import Costs, model_costs
from rankwise.compress.lowrank import LowRankLinear, factorize_linear, low_rank_factors
from rankwise.compress.pipeline import compress
from rankwise.compress.registry import METHODS, make_compressor
from rankwise.compress.storage import is_compressed, load_compressed, save_compressed

__all__ = [
    "METHODS",
    "A3Attention",
    "Calibration",
    "Compressor",
    "Costs",
    "LowRankLinear",
    "Statistics",
    "calibration_data",
    "collect_statistics",
    "compress",
    "compress_model",
    "factorize_linear",
    "is_compressed",
    "load_compressed",
    "low_rank_factors",
    "make_compressor",
    "merge_needs",
    "model_costs",
    "save_compressed",
]

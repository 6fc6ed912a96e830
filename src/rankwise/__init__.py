"""rankwise: low-rank adaptation of language models (adapt, mix, merge, compress, serve)."""

from rankwise.adapters import (
    LoraConfig,
    LoraWeights,
    LowRankExperts,
    attach_adapters,
    inject_adapter,
    load_adapter,
    merge_experts,
    read_adapter,
    remove_experts,
    save_adapter,
    unmerge_experts,
)
from rankwise.errors import RankwiseError
from rankwise.models import load_model

__version__ = "0.1.0"
__all__ = [
    "LoraConfig",
    "LoraWeights",
    "LowRankExperts",
    "RankwiseError",
    "attach_adapters",
    "inject_adapter",
    "load_adapter",
    "load_model",
    "merge_experts",
    "read_adapter",
    "remove_experts",
    "save_adapter",
    "unmerge_experts",
]

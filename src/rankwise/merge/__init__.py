"""LoRA merging: adapters in, one adapter out (linear, TIES, DARE, LoRA-LEGO, and in core space
TSV-M, Iso-C/CTS, KnOTS and RegMean).

Each method is one module; ``METHODS`` in ``registry.py`` names them all; ``merge_adapters`` runs
any of them.
"""

from rankwise.merge.api import MergeReport, MergeResult, merge_adapters
from rankwise.merge.base import Contribution, MergeMethod, MergeOptions, ModuleMerge
from rankwise.merge.config import MergeConfig, run_merge
from rankwise.merge.registry import METHODS

__all__ = [
    "METHODS",
    "Contribution",
    "MergeConfig",
    "MergeMethod",
    "MergeOptions",
    "MergeReport",
    "MergeResult",
    "ModuleMerge",
    "merge_adapters",
    "run_merge",
]

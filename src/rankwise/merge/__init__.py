"""Training-free LoRA merging (linear, TIES, DARE, LoRA-LEGO): adapters in, one adapter out.

Each method is one module registered by name in ``METHODS``; ``merge_adapters`` runs any of them.
"""

# Importing a method registers it; this order is the order users see (CLI choices, errors).
# isort: off
from rankwise.merge import linear, ties, dare, lego  # noqa: F401

# isort: on
from rankwise.merge.api import MergeReport, MergeResult, merge_adapters
from rankwise.merge.base import METHODS, Contribution, MergeMethod, MergeOptions, ModuleMerge
from rankwise.merge.config import MergeConfig, run_merge

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

"""Merging from folders: a typed config whose keys are the CLI flags (``rankwise.options``)."""

from __future__ import annotations

from dataclasses import dataclass

from rankwise.adapters import read_adapter, write_adapter
from rankwise.errors import RankwiseError
from rankwise.merge.api import MergeResult, merge_adapters
from rankwise.merge.registry import METHODS
from rankwise.options import Options, option


@dataclass
class MergeConfig(Options):
    """One merge: which adapter folders, how, and where the merged adapter goes."""

    adapters: list[str] = option([], "PEFT adapter folders to merge")
    output: str | None = option(None, "folder the merged PEFT adapter is written to")
    method: str = option("linear", "how the adapters are merged", choices=lambda: list(METHODS))
    weights: list[float] | None = option(
        None, "one per adapter, multiplies its update (unset: 1 each)", spaced=True
    )
    density: float | None = option(
        None, "fraction of entries kept (ties: 0.2, dare_*: 0.5 by default)", within="(0, 1]"
    )
    rank: int | None = option(
        None, "rank of the merged adapter (unset: the largest input rank)", within="[1, inf)"
    )
    seed: int = option(0, "seeds DARE's drops and LoRA-LEGO's k-means")

    def check(self) -> None:
        super().check()
        if not self.adapters:
            raise RankwiseError("give the adapter folders to merge")
        if not self.output:
            raise RankwiseError("give the output folder for the merged adapter (-o/--output)")


def run_merge(config: MergeConfig) -> MergeResult:
    """Read the adapter folders, merge them and write the merged adapter to ``config.output``."""
    adapters = [read_adapter(path) for path in config.adapters]
    result = merge_adapters(
        adapters,
        method=config.method,
        weights=config.weights,
        density=config.density,
        rank=config.rank,
        seed=config.seed,
        names=[f"adapter '{path}'" for path in config.adapters],
    )
    write_adapter(result.weights, config.output)
    return result

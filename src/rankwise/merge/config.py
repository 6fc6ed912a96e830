"""Merging from folders: a typed config whose keys are the CLI flags, from flags or a YAML file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from rankwise.adapters import read_adapter, write_adapter
from rankwise.configfile import load_yaml
from rankwise.errors import RankwiseError
from rankwise.merge.api import MergeResult, merge_adapters


@dataclass
class MergeConfig:
    """One merge: which adapter folders, how, and where the merged adapter goes."""

    adapters: list[str] = field(default_factory=list)  # PEFT adapter folders to merge
    output: str | None = None  # folder the merged PEFT adapter is written to
    method: str = "linear"  # linear, ties, dare_linear, dare_ties or lego
    weights: list[float] | None = None  # one per adapter, multiplies its update (default 1)
    density: float | None = None  # fraction of entries kept (ties: 0.2, dare_*: 0.5 by default)
    rank: int | None = None  # rank of the merged adapter (default: the largest input rank)
    seed: int = 0  # seeds DARE's drops and LoRA-LEGO's k-means

    def __post_init__(self) -> None:
        if not self.adapters:
            raise RankwiseError("give the adapter folders to merge")
        if not self.output:
            raise RankwiseError("give the output folder for the merged adapter (-o/--output)")


NUMBER = (int, float)
# The YAML type of each key, and of list items (bools are refused: YAML's yes is not a rank).
KEY_TYPES: dict[str, tuple[tuple[type, ...], tuple[type, ...] | None]] = {
    "adapters": ((list,), (str,)),
    "output": ((str,), None),
    "method": ((str,), None),
    "weights": ((list,), NUMBER),
    "density": (NUMBER, None),
    "rank": ((int,), None),
    "seed": ((int,), None),
}


def load_config(path: str | os.PathLike) -> dict:
    """The settings of a YAML merge config; unknown keys and wrong types are an error."""
    file = Path(path)
    data = load_yaml(file)
    known = [f.name for f in fields(MergeConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RankwiseError(
            f"'{file}' has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}"
        )
    for key, value in data.items():
        kind, item = KEY_TYPES[key]
        items = value if item and isinstance(value, list) else []
        if value is not None and not (
            of_type(value, kind) and all(of_type(v, item or ()) for v in items)
        ):
            what = f"a list of {item[0].__name__}" if item else kind[-1].__name__
            raise RankwiseError(f"'{file}': {key} must be {what}, got {value!r}")
    return data


def of_type(value: object, kind: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is never a number."""
    return isinstance(value, kind) and not isinstance(value, bool)


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

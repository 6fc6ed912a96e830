"""Merging from folders: a typed config whose keys are the CLI flags (``rankwise.options``).

The chosen method's own settings (``common_fraction``, ``alpha``, ...) are flat keys and flags
too (``rankwise.options.method_settings``); ``settings`` holds those of the chosen method. The
base model (``model``, ``dtype``, ``device``) is loaded only for methods that read calibration
data (``calib``, one source per adapter).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rankwise.adapters import read_adapter, write_adapter
from rankwise.adapters.lori import read_lori_record
from rankwise.errors import RankwiseError
from rankwise.merge.api import MergeResult, check_grams, merge_adapters, method_named
from rankwise.merge.calibration import merge_layer_by_layer, task_grams
from rankwise.merge.interference import InterferenceReport, interference
from rankwise.merge.learned import OBJECTIVES, learn_coefficients
from rankwise.merge.registry import METHODS
from rankwise.models import ModelOptions
from rankwise.options import MethodSettings, Options, flagless, option


def method_options() -> dict[str, type]:
    """Each method's settings class, by method name (for flat flags and keys)."""
    return {name: method.settings for name, method in METHODS.items()}


@dataclass
class MergeConfig(MethodSettings, ModelOptions):
    """One merge: which adapter folders, how, and where the merged adapter goes."""

    adapters: list[str] = option([], "PEFT adapter folders to merge")
    output: str | None = option(None, "folder the merged PEFT adapter is written to")
    method: str = option("linear", "how the adapters are merged", choices=lambda: list(METHODS))
    weights: list[float] | None = option(
        None, "one per adapter, multiplies its update (unset: 1 each)", spaced=True
    )
    density: float | None = option(
        None,
        "fraction of entries kept (ties, knots_ties: 0.2; dare_*, knots_dare_ties: 0.5 by default)",
        within="(0, 1]",
    )
    rank: int | None = option(
        None, "rank of the merged adapter (unset: the largest input rank)", within="[1, inf)"
    )
    seed: int = option(0, "seeds DARE's drops and LoRA-LEGO's k-means")
    calib: list[str] = option(
        [], "a few examples of each adapter's task, one data spec or path per adapter, in order "
        "(regmean and --learn entropy read only the prompts)", spaced=True,
    )  # fmt: skip
    learn: str | None = option(
        None, "learn one weight per adapter and module on --calib, then merge linearly: loss "
        "(answers' cross-entropy, LoRA Soups/CAT) or entropy (unlabeled prompts, AdaMerging)",
        choices=OBJECTIVES,
    )  # fmt: skip
    learn_steps: int = option(50, "learn: optimizer steps (one example per task each)",
                              within="[1, inf)")  # fmt: skip
    learn_lr: float = option(0.05, "learn: Adam learning rate of the coefficients",
                             within="(0, inf)")  # fmt: skip
    calib_samples: int = option(64, "records read from each calibration source", within="[1, inf)")
    calib_seq_len: int = option(256, "tokens per calibration row", within="[2, inf)")
    report: bool = option(
        False, "print the adapters' interference per pair and module (cosine, subspace overlap)"
    )
    settings: dict[str, Any] = flagless({}, "the chosen method's own settings")

    def check(self) -> None:
        super().check()
        if not self.adapters:
            raise RankwiseError("give the adapter folders to merge")
        if not self.output and not self.report:
            raise RankwiseError("give the output folder for the merged adapter (-o/--output)")
        merger = method_named(self.method)
        merger.settings.from_mapping(self.settings, f"the settings of {self.method}")  # early
        if self.learn:
            if self.method != "linear":
                raise RankwiseError(
                    f"--learn trains the weights of a linear merge, not {self.method}"
                )
            if len(self.calib) != len(self.adapters):
                raise RankwiseError(
                    f"--learn needs one --calib source per adapter: got {len(self.calib)} for "
                    f"{len(self.adapters)} adapters"
                )
            return
        if self.calib and not merger.needs_calibration:
            users = ", ".join(n for n, m in METHODS.items() if m.needs_calibration)
            raise RankwiseError(f"--calib applies to {users} and --learn, not to {self.method}")
        if self.output:
            calib = self.calib or None
            check_grams(merger, self.method, self.adapters, calib)

    @classmethod
    def methods(cls) -> Mapping[str, type[Options]]:
        return method_options()


def run_merge(config: MergeConfig) -> MergeResult:
    """Read the adapter folders, merge them and write the merged adapter to ``config.output``."""
    adapters = [read_adapter(path) for path in config.adapters]
    warning = lori_warning(config.adapters)
    if warning:
        print(warning, file=sys.stderr)

    weights = config.weights
    if config.learn:
        adapters = learn_coefficients(
            config.load(),
            adapters,
            config.calib,
            kind=config.learn,
            start=config.weights,
            steps=config.learn_steps,
            lr=config.learn_lr,
            samples=config.calib_samples,
        )
        weights = None  # folded into the adapters

    def merge(parts: list, grams: list | None) -> MergeResult:
        return merge_adapters(
            parts,
            method=config.method,
            weights=weights,
            density=config.density,
            rank=config.rank,
            seed=config.seed,
            names=[f"adapter '{path}'" for path in config.adapters],
            settings=config.settings,
            grams=grams,
        )

    merger = method_named(config.method)
    calib = {"samples": config.calib_samples, "seq_len": config.calib_seq_len}
    if not config.calib or config.learn:
        result = merge(adapters, None)
    elif merger.layer_by_layer(merger.settings.from_mapping(config.settings)):
        result = merge_layer_by_layer(config.load(), adapters, config.calib, merge, **calib)
    else:
        result = merge(adapters, task_grams(config.load(), adapters, config.calib, **calib))
    write_adapter(result.weights, config.output)
    return result


def run_report(config: MergeConfig) -> InterferenceReport:
    """The interference diagnostics of the configured adapters (no merge)."""
    return interference([read_adapter(p) for p in config.adapters], config.adapters)


def lori_warning(folders: Sequence[str]) -> str | None:
    """One line when a merge loses what LoRI training gave (a mix, or a shared seed), else None."""
    records = {folder: read_lori_record(folder) for folder in folders}
    lori = [f for f, r in records.items() if r]
    if lori and len(lori) < len(folders):
        plain = [f for f, r in records.items() if not r]
        return (
            f"warning: {', '.join(lori)} trained mergeable (LoRI) but {', '.join(plain)} not: "
            "a trained A overlaps every task's inputs, so the merge loses LoRI's low interference"
        )
    seeds: dict[int, str] = {}
    for folder in lori:
        seed = records[folder]["seed"]
        if seed in seeds:
            return (
                f"warning: {seeds[seed]} and {folder} share LoRI seed {seed}: their frozen A's are "
                "equal, so their updates act on the same inputs and interfere"
            )
        seeds[seed] = folder
    return None

"""``rankwise mix train``: the training loop of ``rankwise.train`` with a mixture attached.

A mixture's config is a run's settings (``RunConfig``), the router's name and that router's
own settings, all flat: ``router: mola`` plus ``num_experts: 4`` in one YAML file, or the
same as flags. ``mix_config(router)`` is the class for one router; ``MixConfig.from_mapping``
picks it from the ``router`` key, so a key that belongs to another router is an error that
says so.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rankwise.configfile import load_yaml
from rankwise.errors import RankwiseError
from rankwise.mixture.mixture import Mixture, build_mixture
from rankwise.models import LoadedModel
from rankwise.options import Options, option
from rankwise.routers import ROUTERS
from rankwise.train.config import RunConfig
from rankwise.train.loop import TrainResult, train


@dataclass
class MixConfig(RunConfig):
    """A run that trains a mixture; the router's settings come from ``mix_config(router)``."""

    data: str = option("task:all", "training data (default: the built-in tasks mixed together)")
    output_dir: str = option(
        "runs/mixture", "folder for the mixture, checkpoints/, metrics.jsonl and loss.png"
    )
    router: str = option("mola", "how the experts are gated", choices=lambda: list(ROUTERS))

    def check(self) -> None:
        super().check()
        if type(self) is not mix_config(self.router):
            raise RankwiseError(
                f"build a mixture config with MixConfig.from_mapping, not {type(self).__name__}"
            )

    def router_options(self) -> Options:
        """The router's settings alone (what a saved mixture records)."""
        fields = ROUTERS[self.router].options.__dataclass_fields__
        return ROUTERS[self.router].options(**{name: getattr(self, name) for name in fields})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> MixConfig:
        """The config of ``values['router']`` (default mola); other routers' keys fail."""
        if cls is not MixConfig:  # a router's own config class
            return super().from_mapping(values, source)
        router = values.get("router", "mola")
        if router not in ROUTERS:
            raise RankwiseError(f"unknown router '{router}': choose one of {', '.join(ROUTERS)}")
        chosen = mix_config(router)
        known = set(chosen.__dataclass_fields__)
        for key in values:
            owners = [n for n, r in ROUTERS.items() if key in r.options.__dataclass_fields__]
            if key not in known and owners:
                raise RankwiseError(
                    f"'{key}' is a setting of router {', '.join(owners)}, not of {router}"
                )
        return chosen.from_mapping(values, source)

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
        """The run's flags, ``--router`` and every router's settings (each named once)."""
        super().add_flags(parser, skip)
        for router in ROUTERS.values():
            router.options.add_flags(parser, skip)

    @classmethod
    def from_args(cls, args: argparse.Namespace, config_file: str | None = None) -> MixConfig:
        values = load_yaml(config_file) if config_file else {}
        values |= cls.values_from_args(args)
        for router in ROUTERS.values():
            values |= router.options.values_from_args(args)
        return cls.from_mapping(values, config_file or "flags")


@functools.cache
def mix_config(router: str) -> type[MixConfig]:
    """The config class of a mixture trained with ``router``: run settings + router settings.

    The two declare disjoint settings, so neither changes the other's defaults.
    """
    options = ROUTERS[router].options
    overlap = set(options.__dataclass_fields__) & set(MixConfig.__dataclass_fields__)
    if overlap:
        raise TypeError(f"{options.__name__} redeclares run settings {sorted(overlap)}")
    body = {
        "__doc__": f"A run that trains a mixture routed by {router}.",
        "__annotations__": {"router": str},
        "router": option(router, "how the experts are gated", choices=lambda: list(ROUTERS)),
    }
    return dataclass(type(f"{ROUTERS[router].__name__}MixConfig", (options, MixConfig), body))


def attach_mixture(loaded: LoadedModel, config: MixConfig) -> Mixture:
    """Build the config's mixture on the model: what the loop trains."""
    return build_mixture(loaded.model, config.router, config.router_options())


def train_mixture(config: MixConfig, resume: bool = False) -> TrainResult:
    """Train a mixture as ``config`` says and write it to ``config.output_dir``."""
    return train(config, resume, attach=attach_mixture)

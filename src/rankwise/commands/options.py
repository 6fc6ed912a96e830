"""What the verbs share on the command line: the options file, the adapted model, the parsing.

Every verb declares its settings as one ``rankwise.options.Options`` class; ``add_options``
turns it into flags (plus ``--config FILE``, whose YAML keys are the same names) and
``parse_options`` back into a validated instance.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from rankwise.adapters import load_adapter
from rankwise.errors import RankwiseError
from rankwise.mixture import load_mixture
from rankwise.models import LoadedModel, ModelOptions
from rankwise.options import Options, option


def add_options(
    parser: argparse.ArgumentParser, cls: type[Options], positional_config: bool = False
) -> None:
    """A flag per setting of ``cls``, and the YAML file they may also come from."""
    if positional_config:
        parser.add_argument("config", nargs="?", default=None, help="YAML file of settings")
    else:
        parser.add_argument("--config", default=None, help="YAML file of settings (keys = flags)")
    cls.add_flags(parser)
    parser.set_defaults(options=cls)


def parse_options(args: argparse.Namespace) -> Options:
    """The verb's settings: the YAML file's values overridden by the flags given."""
    return args.options.from_args(args, args.config)


@dataclass
class AdaptedModelOptions(ModelOptions):
    """A base model with, optionally, an adapter or a mixture on it."""

    adapter: str | None = option(None, "PEFT-format LoRA adapter folder to attach")
    mixture: str | None = option(None, "mixture folder from `rankwise mix train` to attach")

    def check(self) -> None:
        super().check()
        if self.adapter and self.mixture:
            raise RankwiseError("give --adapter or --mixture, not both")

    def load(self) -> LoadedModel:
        """The model with its adapter or mixture attached."""
        loaded = super().load()
        if self.adapter:
            load_adapter(loaded.model, self.adapter)
        if self.mixture:
            load_mixture(loaded.model, self.mixture)
        return loaded

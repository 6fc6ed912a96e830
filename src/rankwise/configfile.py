"""Reading YAML config files (training, mixtures, merges) with one-sentence errors."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from rankwise.errors import RankwiseError


def load_yaml(path: str | os.PathLike) -> dict:
    """The mapping a YAML config file holds; a missing file or bad YAML is a RankwiseError."""
    file = Path(path)
    if not file.is_file():
        raise RankwiseError(f"config file '{file}' does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise RankwiseError(f"'{file}' is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(values, dict):
        raise RankwiseError(f"'{file}' must be a mapping of config keys")
    return values

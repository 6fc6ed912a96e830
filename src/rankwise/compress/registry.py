"""Compression methods by name: the one place a new method is registered."""

from __future__ import annotations

import dataclasses

from rankwise.compress.a3 import A3
from rankwise.compress.asvd import ASVD
from rankwise.compress.base import Compressor
from rankwise.compress.prune24 import Prune24
from rankwise.compress.svd import SVD
from rankwise.compress.svd_llm import SVDLLM
from rankwise.errors import RankwiseError

METHODS: dict[str, type[Compressor]] = {cls.name: cls for cls in (SVD, ASVD, SVDLLM, A3, Prune24)}


def make_compressor(method: str, **options) -> Compressor:
    """The compressor named ``method`` with its options; unknown names and options are errors."""
    if method not in METHODS:
        raise RankwiseError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    cls = METHODS[method]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RankwiseError(
            f"method '{method}' does not take {', '.join(unknown)}; "
            f"its options: {', '.join(known) or 'none'}"
        )
    return cls(**options)

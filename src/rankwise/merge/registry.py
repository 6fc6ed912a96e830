"""Merge methods by name: the one place a method is registered, in the order users see."""

from __future__ import annotations

from rankwise.merge.base import MergeMethod
from rankwise.merge.dare import DareLinearMerge, DareTiesMerge
from rankwise.merge.iso import IsoCMerge, IsoCtsMerge
from rankwise.merge.knots import KnotsDareTiesMerge, KnotsTiesMerge
from rankwise.merge.lego import LegoMerge
from rankwise.merge.linear import LinearMerge
from rankwise.merge.regmean import RegMeanMerge
from rankwise.merge.ties import TiesMerge
from rankwise.merge.tsv import TsvMerge

METHODS: dict[str, MergeMethod] = {
    "linear": LinearMerge(),
    "ties": TiesMerge(),
    "dare_linear": DareLinearMerge(),
    "dare_ties": DareTiesMerge(),
    "lego": LegoMerge(),
    "tsv": TsvMerge(),
    "iso_c": IsoCMerge(),
    "iso_cts": IsoCtsMerge(),
    "knots_ties": KnotsTiesMerge(),
    "knots_dare_ties": KnotsDareTiesMerge(),
    "regmean": RegMeanMerge(),
}

"""Routers over low-rank experts (xlora, mola, smora, flylora, radargate) and mixture IO."""

from rankwise.routers import flylora, mola, radargate, smora, xlora
from rankwise.routers.base import ROUTERS, Router, RouterConfig
from rankwise.routers.mixture import Mixture, build_mixture, load_mixture, save_mixture

__all__ = [
    "ROUTERS",
    "Mixture",
    "Router",
    "RouterConfig",
    "build_mixture",
    "flylora",
    "load_mixture",
    "mola",
    "radargate",
    "save_mixture",
    "smora",
    "xlora",
]

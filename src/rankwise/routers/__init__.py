"""Gate policies over low-rank experts, one file per paper, registered by name in ``ROUTERS``.

The mixtures they drive (building, training, saving, inspecting) live in ``rankwise.mixture``.
"""

from rankwise.routers.base import ExpertOptions, Router
from rankwise.routers.flylora import FlyLoRA
from rankwise.routers.mola import MoLA
from rankwise.routers.radargate import RadarGate
from rankwise.routers.smora import SMoRA
from rankwise.routers.softmax import Softmax
from rankwise.routers.xlora import XLoRA

# The one place a router is registered; this order is the order users see.
ROUTERS: dict[str, type[Router]] = {
    cls.name: cls for cls in (Softmax, MoLA, SMoRA, FlyLoRA, RadarGate, XLoRA)
}

__all__ = ["ROUTERS", "ExpertOptions", "Router"]

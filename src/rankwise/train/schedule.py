"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math


def learning_rate(step: int, peak: float, warmup: int, total: int, kind: str) -> float:
    """The learning rate for optimizer step ``step`` (0-based): linear warm-up, then decay.

    ``cosine`` and ``linear`` decay to zero at ``total``; ``constant`` stays at ``peak``.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))

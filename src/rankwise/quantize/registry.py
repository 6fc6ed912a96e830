"""``rankwise quantize`` methods by name: the one place a new method is registered."""

from __future__ import annotations

from rankwise.quantize.l4q import L4QExport
from rankwise.quantize.loftq import LoftQ
from rankwise.quantize.lqlora import LQLoRA
from rankwise.quantize.method import QuantizeMethod, plain

METHODS: dict[str, type[QuantizeMethod]] = {
    cls.name: cls for cls in (plain(4), plain(3), plain(2), plain(8), LoftQ, LQLoRA, L4QExport)
}

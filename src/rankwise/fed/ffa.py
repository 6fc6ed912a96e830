"""FFA-LoRA (arXiv 2403.12313): A frozen at its shared random init, only B trains and travels.

With one A for every client, Σ p_k B_k A = (Σ p_k B_k) A: averaging B is exact. A is drawn once
from the run's seed (``rankwise.fed.client`` makes it the same on every client) and sent down
like any trained part; only B goes up, half of FedIT's uplink.
"""

from __future__ import annotations

from rankwise.fed.base import Method


class FFA(Method):
    name = "ffa"
    paper = "2403.12313"
    exact = True
    trains = ("B",)

"""The aggregation methods by name, in the order users see them."""

from __future__ import annotations

from rankwise.errors import RankwiseError
from rankwise.fed.base import Method
from rankwise.fed.fedex import FedEx
from rankwise.fed.fedit import FedIT
from rankwise.fed.fedsb import FedSB
from rankwise.fed.ffa import FFA
from rankwise.fed.flora import FLoRA
from rankwise.fed.hello import Hello
from rankwise.fed.legend import Legend

METHODS: dict[str, type[Method]] = {
    "fedit": FedIT,
    "fedex": FedEx,
    "ffa": FFA,
    "flora": FLoRA,
    "fedsb": FedSB,
    "hello": Hello,
    "legend": Legend,
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise RankwiseError(
            f"unknown federated method '{name}': choose one of {', '.join(METHODS)}"
        )
    return METHODS[name]()

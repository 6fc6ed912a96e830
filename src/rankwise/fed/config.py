"""``rankwise fed``'s settings: a training run (every ``rankwise train`` key) plus the federation.

``max_steps`` is each client's local optimizer steps per round; the learning-rate schedule
restarts every round (the client's optimizer is fresh each round, as in FedIT and FLoRA).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rankwise.errors import RankwiseError
from rankwise.fed.hello import PATTERNS
from rankwise.fed.registry import METHODS
from rankwise.options import option
from rankwise.train.config import TrainConfig

PARTITION = re.compile(r"^(iid|task|dirichlet:(\d+(\.\d*)?|\.\d+))$")
PLAIN_INITS = ("init_a", "init_b", "gaussian")


@dataclass
class FedConfig(TrainConfig):
    """A federated run: which aggregation, how many clients and rounds, how data is split."""

    method: str = option("fedsb", "aggregation method", choices=lambda: list(METHODS))
    clients: int = option(2, "number of clients (simulated SuperNodes)", within="[1, inf)")
    rounds: int = option(3, "federated rounds", within="[1, inf)")
    partition: str = option(
        "iid",
        "how the data is split over the clients: iid, dirichlet:ALPHA (by task) or task "
        "(one task per client), by flwr-datasets' partitioners",
    )
    client_ranks: list[int] = option(
        [], "flora: client k trains rank client_ranks[k mod len] (empty: r for everyone)"
    )
    min_clients: int = option(
        0,
        "replies a round needs to aggregate (0: all clients); fewer replies and the round "
        "fails, more failures are tolerated",
        within="[0, inf)",
    )
    hello_budget: list[int] = option(
        [],
        "hello: client k trains the LoRA layers of hello_budget[k mod len] decoder blocks (its "
        "resources; empty: half the blocks, rounded up)",
        within="[1, inf)",
    )
    hello_pattern: str = option(
        "fisher",
        "hello: which blocks a client trains: fisher (its highest gradient-norm blocks, measured "
        "each round) or a geometric pattern: triangle (nearest the input), inverted_triangle "
        "(nearest the output), bottleneck (both ends), uniform (evenly spaced)",
        choices=PATTERNS,
    )
    hello_fisher_batches: int = option(
        2, "hello fisher: batches of the client's gradient for its block scores", within="[1, inf)"
    )
    capabilities: list[float] = option(
        [],
        "legend: client k's capability capabilities[k mod len] sets its LoRA depth (blocks from "
        "the output) and ranks (empty: 1 for everyone, every block at full rank)",
        within="(0, 1]",
    )
    fedsb_init_batches: int = option(
        2, "fedsb: batches of each client's gradient estimate for the SVD init", within="[1, inf)"
    )
    eval_records: int = option(
        16, "validation prompts per task scored by exact match each round", within="[0, inf)"
    )
    round_timeout: float = option(3600.0, "seconds the server waits for a round's replies")

    def check(self) -> None:
        super().check()
        if not PARTITION.match(self.partition):
            raise RankwiseError(
                f"partition must be iid, task or dirichlet:ALPHA, got '{self.partition}'"
            )
        plain = (("use_dora", self.use_dora), ("l4q_bits", self.l4q_bits))
        for flag, given in (*plain, ("init_adapter", self.init_adapter)):
            if given:
                raise RankwiseError(
                    f"federated runs train plain LoRA factors: {flag} is not supported"
                )
        if self.init not in PLAIN_INITS:
            raise RankwiseError(
                f"federated runs start every client from the same factors: init must be one of "
                f"{', '.join(PLAIN_INITS)}, not {self.init}"
            )
        if self.client_ranks and self.method != "flora":
            raise RankwiseError("client_ranks (mixed ranks) needs method flora, which stacks them")
        for key, method in (("hello_budget", "hello"), ("capabilities", "legend")):
            if getattr(self, key) and self.method != method:
                raise RankwiseError(f"{key} is a setting of method {method}, not {self.method}")
        if self.min_clients > self.clients:
            raise RankwiseError(f"min_clients {self.min_clients} exceeds clients {self.clients}")

    def client_rank(self, partition_id: int) -> int:
        return (
            self.client_ranks[partition_id % len(self.client_ranks)]
            if self.client_ranks
            else self.r
        )

    @property
    def needed_replies(self) -> int:
        return self.min_clients or self.clients

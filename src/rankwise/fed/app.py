"""The Flower app (Message API): a ``ClientApp``, a ``ServerApp`` and the strategy between them.

The same app runs in a one-machine simulation (Ray actors) and in a deployment (SuperLink,
SuperNodes). The server reads the run's settings from the JSON file named by the run config's
``rankwise-config`` and sends them in every message, so a client needs only its node config:
``partition-id`` and, deployed, ``data`` (a node-local path; simulated clients read
``partitions/client-K.jsonl``). The base model is cached per process (a Ray actor serves many
virtual clients with one copy). Fed-SB's frozen B and A are sent once and kept in the node's
``context.state``; every other method sends the whole global state each round (stateless
clients). Arrays travel as fp32 (Flower's ``ArrayRecord`` rejects bf16).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from rankwise.fed.base import payload_bytes, state_from_flat
from rankwise.fed.client import gradient_estimate, initial_state, local_round
from rankwise.fed.config import FedConfig
from rankwise.fed.fedsb import fedsb_init
from rankwise.fed.registry import get_method
from rankwise.fed.server import FedServer
from rankwise.models import LoadedModel, load_model

CONFIG_KEY = "rankwise-config"
FROZEN_KEY = "rankwise-frozen"  # context.state: Fed-SB's B and A on a client
BASES: dict[tuple, LoadedModel] = {}  # per process: one base model for every virtual client


def base_model(config: FedConfig) -> LoadedModel:
    key = (config.model, config.dtype, config.device)
    if key not in BASES:
        BASES[key] = load_model(config.model, config.dtype, config.device)
    return BASES[key]


def fp32(flat: dict) -> dict:
    return {k: v.detach().float().cpu().contiguous() for k, v in flat.items()}


def client_data(context: Context, config: FedConfig) -> str:
    if "data" in context.node_config:
        return str(context.node_config["data"])
    pid = int(context.node_config["partition-id"])
    return str(config.output / "partitions" / f"client-{pid}.jsonl")


client_app = ClientApp()


@client_app.train()
def train_round(msg: Message, context: Context) -> Message:
    settings = msg.content["config"]
    config = FedConfig.from_mapping(json.loads(str(settings["settings"])), "the server")
    method = get_method(config.method)
    flat = msg.content["arrays"].to_torch_state_dict()
    if FROZEN_KEY in msg.content:  # Fed-SB's first round here: keep B and A for later rounds
        context.state[FROZEN_KEY] = msg.content[FROZEN_KEY]
    if method.name == "fedsb":
        flat |= context.state[FROZEN_KEY].to_torch_state_dict()
    state = state_from_flat(flat, json.loads(str(settings["scales"])))
    loaded = base_model(config)
    pid = int(context.node_config.get("partition-id", 0))
    update, loss = local_round(
        loaded, config, method, state, client_data(context, config), pid, int(settings["round"])
    )
    up = fp32(method.uplink(update))
    scale = next(iter(update.scales.values()))
    metrics = {"num-examples": update.weight, "train-loss": loss, "scale": scale}
    return Message(
        RecordDict({"arrays": ArrayRecord(up), "metrics": MetricRecord(metrics)}), reply_to=msg
    )


@client_app.query()
def gradient(msg: Message, context: Context) -> Message:
    """Fed-SB's initialisation round: this client's gradient estimate of every targeted W."""
    config = FedConfig.from_mapping(json.loads(str(msg.content["config"]["settings"])), "server")
    loaded = base_model(config)
    grads = gradient_estimate(
        loaded, config, client_data(context, config), config.fedsb_init_batches
    )
    metrics = MetricRecord({"num-examples": 1.0})
    return Message(
        RecordDict({"arrays": ArrayRecord(fp32(grads)), "metrics": metrics}), reply_to=msg
    )


class RankwiseStrategy(FedAvg):
    """FedAvg's sampling and messaging; the aggregation is the run's method (``FedServer``)."""

    def __init__(self, server: FedServer):
        needed = server.config.needed_replies
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=needed,
            min_available_nodes=needed,
        )
        self.server, self.first = server, True
        self.downlink_bytes = self.downlink_analytic = 0

    def configure_train(self, server_round, arrays, config, grid):
        server = self.server
        payload = fp32(server.method.downlink(server.state))
        record = RecordDict({"arrays": ArrayRecord(payload)})
        self.downlink_bytes = record["arrays"].count_bytes()
        self.downlink_analytic = payload_bytes(payload)
        if server.method.name == "fedsb" and self.first:
            frozen = server.method.frozen(server.state)
            record[FROZEN_KEY] = ArrayRecord(fp32(frozen))
            self.downlink_bytes += record[FROZEN_KEY].count_bytes()
            self.downlink_analytic += payload_bytes(frozen)
        self.first = False
        settings = {
            "settings": json.dumps(server.config.as_dict()),
            "scales": json.dumps(server.scales),
            "round": server.round + 1,
        }
        record["config"] = ConfigRecord(settings)
        num_nodes = len(list(grid.get_node_ids()))
        nodes, _ = sample_nodes(
            grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes)
        )
        self.sent = len(nodes)
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round, replies):
        # no key check: hello's and legend's clients send different modules (and ranks)
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        server, method = self.server, self.server.method
        updates, losses, up, up_analytic = [], [], 0, 0
        for reply in valid:
            flat = reply.content["arrays"].to_torch_state_dict()
            metrics = reply.content["metrics"]
            up += reply.content["arrays"].count_bytes()
            up_analytic += payload_bytes(flat)
            updates.append(
                method.from_uplink(server.state, flat, metrics["scale"], metrics["num-examples"])
            )
            losses.append(float(metrics["train-loss"]))
        traffic = {
            "uplink_bytes": up,
            "uplink_bytes_analytic": up_analytic,
            "downlink_bytes": self.downlink_bytes * self.sent,
            "downlink_bytes_analytic": self.downlink_analytic * self.sent,
            "failed_replies": self.sent - len(valid),
        }
        line = server.finish_round(server.round + 1, updates, losses, traffic)
        print(summary(line), flush=True)
        numbers = {k: v for k, v in line.items() if isinstance(v, int | float)}
        return None, MetricRecord(numbers)


def summary(line: dict) -> str:
    parts = [f"round {line['round']}"]
    if "val_loss" in line:
        parts.append(f"val loss {line['val_loss']:.4f}")
    if "exact_match" in line:
        parts.append(f"exact match {line['exact_match']:.3f}")
    losses = ", ".join(f"{x:.3f}" for x in line["client_losses"])
    parts.append(f"client losses [{losses}]")
    parts.append(f"up {line['uplink_bytes']} B, down {line['downlink_bytes']} B")
    parts.append(f"aggregation error {line['aggregation_error']:.2e}")
    return "; ".join(parts)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    path = Path(str(context.run_config[CONFIG_KEY]))
    saved = json.loads(path.read_text())
    config, resume = FedConfig.from_mapping(saved["config"], str(path)), bool(saved["resume"])
    loaded = load_model(config.model, config.dtype, config.device)
    server = FedServer(config, loaded, resume)
    if not resume:
        state = initial_state(loaded, config, server.method)
        if server.method.name == "fedsb":
            state = fedsb_round(grid, config, state)
        server.set_state(state)
    strategy = RankwiseStrategy(server)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=config.rounds - server.round,
        timeout=config.round_timeout,
    )


def fedsb_round(grid: Grid, config: FedConfig, state):
    """Ask every client for its gradient estimate; B, A from the SVD of their weighted mean."""
    nodes, _ = sample_nodes(grid, config.needed_replies, config.clients)
    settings = ConfigRecord({"settings": json.dumps(config.as_dict())})
    messages = [
        Message(RecordDict({"config": settings}), message_type=MessageType.QUERY, dst_node_id=n)
        for n in nodes
    ]
    replies = [
        r
        for r in grid.send_and_receive(messages, timeout=config.round_timeout)
        if not r.has_error()
    ]
    grads = [r.content["arrays"].to_torch_state_dict() for r in replies]
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
    scale = next(iter(state.values())).scale
    return fedsb_init(grads, [w / sum(weights) for w in weights], config.r, scale)

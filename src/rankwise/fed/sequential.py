"""Rounds in one process without Flower: every client in turn (tests, benchmarks, notebooks).

It calls what the Flower app calls (``local_round`` for a client, ``FedServer`` for the server),
so it aggregates what a simulation would. Bytes are the analytic counts of the payloads the app
sends (equal to Flower's ``ArrayRecord.count_bytes()``; a test checks it), Fed-SB's frozen B and A
counted in round 1. A client raising one of ``lost`` is a failed reply, as Flower counts a
ClientApp that raised.
"""

from __future__ import annotations

import time

from rankwise.fed.base import GlobalState, normalised, payload_bytes
from rankwise.fed.client import gradient_estimate, initial_state, local_round
from rankwise.fed.fedsb import FedSB, fedsb_init
from rankwise.fed.server import FedServer


def first_state(server: FedServer, datas: list[str]) -> GlobalState:
    """Round 0's global state, after Fed-SB's initialisation round where the method has one."""
    config, loaded, method = server.config, server.loaded, server.method
    state = initial_state(loaded, config, method)
    if isinstance(method, FedSB):
        grads = [gradient_estimate(loaded, config, d, config.fedsb_init_batches) for d in datas]
        scale = next(iter(state.values())).scale
        state = fedsb_init(grads, normalised([1.0] * len(datas)), config.r, scale)
    return state


def run_rounds(
    server: FedServer, datas: list[str], until: int, lost: type[Exception] | tuple = ()
) -> list[dict]:
    """The rounds after the server's last one up to ``until``, client k training on ``datas[k]``;
    returns their metrics lines (also written by the server, with its checkpoints)."""
    config, loaded, method = server.config, server.loaded, server.method
    if server.round == 0:
        server.set_state(first_state(server, datas))
    lines = []
    for number in range(server.round + 1, until + 1):
        started = time.perf_counter()
        down = payload_bytes(method.downlink(server.state))
        if isinstance(method, FedSB) and number == 1:
            down += payload_bytes(method.frozen(server.state))
        replies = []
        for k, data in enumerate(datas):
            try:
                replies.append(local_round(loaded, config, method, server.state, data, k, number))
            except lost:
                continue
        updates = [update for update, _ in replies]
        traffic = {
            "uplink_bytes": sum(payload_bytes(method.uplink(u)) for u in updates),
            "downlink_bytes": down * len(datas),
            "failed_replies": len(datas) - len(replies),
        }
        line = server.finish_round(number, updates, [loss for _, loss in replies], traffic)
        lines.append(line | {"round_seconds": time.perf_counter() - started})
    return lines

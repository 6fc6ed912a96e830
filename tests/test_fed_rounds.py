"""Federated rounds without Flower: a client's round reuses train(), the server checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from fed_support import run_rounds, tiny_config, word_data

from rankwise.adapters import expert_layers, read_adapter
from rankwise.architectures import block_index
from rankwise.errors import RankwiseError
from rankwise.fed import METHODS, get_method
from rankwise.fed.client import initial_state, local_round
from rankwise.fed.server import FedServer, export_adapter
from rankwise.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def clients_data(tmp_path, n=2):
    return [word_data(tmp_path / f"client{k}.jsonl", 12, 10 + k) for k in range(n)]


ALLOCATIONS = {  # the per-client settings of the allocating methods (the tiny model: 2 blocks)
    "hello": {"hello_budget": [1, 2], "hello_pattern": "fisher"},
    "legend": {"capabilities": [0.5, 1.0], "r": 4},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_rounds_leave_the_base_as_it_was(tmp_path, model_dir, method):
    config = tiny_config(tmp_path, model_dir, method=method, **ALLOCATIONS.get(method, {}))
    loaded = load_model(config.model)
    pristine = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    server = FedServer(config, loaded)
    lines = run_rounds(server, clients_data(tmp_path), until=2)
    assert [line["round"] for line in lines] == [1, 2]
    if METHODS[method].exact:
        assert all(line["aggregation_error"] < 1e-5 for line in lines)
    assert not expert_layers(loaded.model)
    assert all(torch.equal(v, pristine[k]) for k, v in loaded.model.state_dict().items())
    adapter = read_adapter(config.output / "adapter")
    exported = export_adapter(server.state, loaded.name)
    for module, (a, b) in exported.factors.items():
        assert torch.allclose(adapter.delta(module), b @ a, atol=1e-6)
    assert (config.output / "rounds.png").is_file()


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, model_dir):
    datas = clients_data(tmp_path)
    whole = tiny_config(tmp_path, model_dir, method="fedex", output_dir=str(tmp_path / "whole"))
    run_rounds(FedServer(whole, load_model(whole.model)), datas, until=2)
    part = tiny_config(tmp_path, model_dir, method="fedex", output_dir=str(tmp_path / "part"))
    run_rounds(FedServer(part, load_model(part.model)), datas, until=1)  # "killed" after round 1
    resumed = FedServer(part, load_model(part.model), resume=True)
    assert resumed.round == 1
    run_rounds(resumed, datas, until=2)
    a, b = read_adapter(whole.output / "adapter"), read_adapter(part.output / "adapter")
    for module in a.factors:
        assert torch.allclose(a.delta(module), b.delta(module), atol=1e-6)
    lines = (part.output / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]


@pytest.mark.parametrize(
    ("method", "expected"),
    [("hello", {0: {0}, 1: {0, 1}}), ("legend", {0: {1}, 1: {0, 1}})],
)
def test_allocating_clients_train_and_send_only_their_blocks(tmp_path, model_dir, method, expected):
    config = tiny_config(
        tmp_path, model_dir, method=method, **ALLOCATIONS[method] | {"hello_pattern": "triangle"}
    )
    loaded = load_model(config.model)
    state = initial_state(loaded, config, get_method(method))
    for k, data in enumerate(clients_data(tmp_path)):
        update, _ = local_round(loaded, config, get_method(method), state, data, k, 1)
        assert {block_index(m) for m in update.parts} == expected[k]
        for module, parts in update.parts.items():
            global_rank = state[module].parts["A"].shape[0]
            assert parts["A"].shape[0] <= global_rank
            assert not torch.equal(parts["B"], state[module].truncated(global_rank).parts["B"])


def test_resume_needs_a_round_and_a_fresh_run_refuses_an_old_one(tmp_path, model_dir):
    config = tiny_config(tmp_path, model_dir, method="ffa")
    with pytest.raises(RankwiseError, match="no finished round"):
        FedServer(config, load_model(config.model), resume=True)
    run_rounds(FedServer(config, load_model(config.model)), clients_data(tmp_path), until=1)
    with pytest.raises(RankwiseError, match="pass --resume"):
        FedServer(config, load_model(config.model))


def test_too_few_replies_fail_the_round(tmp_path, model_dir):
    config = tiny_config(tmp_path, model_dir, method="fedit", clients=3, min_clients=3)
    server = FedServer(config, load_model(config.model))
    with pytest.raises(RankwiseError, match="min_clients"):
        run_rounds(server, clients_data(tmp_path, 2), until=1)

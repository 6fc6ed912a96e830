"""Federated rounds without Flower: a client's round reuses train(), the server checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from fed_support import run_rounds, tiny_config, word_data

from rankwise.adapters import expert_layers, read_adapter
from rankwise.errors import RankwiseError
from rankwise.fed.server import FedServer, export_adapter
from rankwise.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def clients_data(tmp_path, n=2):
    return [word_data(tmp_path / f"client{k}.jsonl", 12, 10 + k) for k in range(n)]


@pytest.mark.parametrize("method", ["fedit", "fedex", "ffa", "flora", "fedsb"])
def test_two_rounds_leave_the_base_as_it_was(tmp_path, model_dir, method):
    config = tiny_config(tmp_path, model_dir, method=method)
    loaded = load_model(config.model)
    pristine = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    server = FedServer(config, loaded)
    lines = run_rounds(server, clients_data(tmp_path), until=2)
    assert [line["round"] for line in lines] == [1, 2]
    if method != "fedit":
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

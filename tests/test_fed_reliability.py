"""Reliability of a federated run, in-process: a client dying mid-round, a server dying mid-run."""

from __future__ import annotations

import pytest
import torch
from fed_support import run_rounds, tiny_config, word_data

from rankwise.adapters import expert_layers, read_adapter
from rankwise.errors import RankwiseError
from rankwise.fed.client import FedAdapter
from rankwise.fed.server import FedServer
from rankwise.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(RuntimeError):
    """A client process dying in the middle of its local training."""


def dies_at(monkeypatch, calls: set[int]) -> None:
    """Make the optimizer steps numbered in ``calls`` (counted over the whole test) raise."""
    seen = []

    def after_step(self, world) -> None:
        seen.append(None)
        if len(seen) in calls:
            raise Killed(f"killed at optimizer step {len(seen)}")

    monkeypatch.setattr(FedAdapter, "after_step", after_step)


def datas(tmp_path, n: int = 3) -> list[str]:
    return [word_data(tmp_path / f"client{k}.jsonl", 12, 10 + k) for k in range(n)]


def test_a_client_dying_mid_round_leaves_the_round_to_the_others(tmp_path, model_dir, monkeypatch):
    config = tiny_config(tmp_path, model_dir, method="fedex", clients=3, min_clients=2, rounds=2)
    loaded = load_model(config.model)
    pristine = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    dies_at(monkeypatch, {1})  # client 0's first step of round 1 (2 steps per client and round)
    server = FedServer(config, loaded)
    lines = run_rounds(server, datas(tmp_path), until=1, lost=Killed)
    assert lines[0]["clients"] == 2 and lines[0]["failed_replies"] == 1
    assert lines[0]["aggregation_error"] < 1e-6
    # the dead client's adapter was taken off and its folded base restored: the next client on
    # the same process trained on the pristine model
    assert not expert_layers(loaded.model)
    assert all(torch.equal(v, pristine[k]) for k, v in loaded.model.state_dict().items())
    lines = run_rounds(server, datas(tmp_path), until=2, lost=Killed)  # the run goes on
    assert lines[0]["round"] == 2 and lines[0]["clients"] == 3
    assert read_adapter(config.output / "adapter").factors


def test_too_many_dead_clients_fail_the_round_and_keep_the_last_checkpoint(
    tmp_path, model_dir, monkeypatch
):
    config = tiny_config(tmp_path, model_dir, method="ffa", clients=3, min_clients=2)
    dies_at(monkeypatch, {1, 3})  # clients 0 and 1 die in round 1
    server = FedServer(config, load_model(config.model))
    with pytest.raises(RankwiseError, match="fewer than the 2 it needs"):
        run_rounds(server, datas(tmp_path), until=1, lost=Killed)
    assert server.round == 0 and not server.finished_rounds()


def final_adapter(output):
    adapter = read_adapter(output / "adapter")
    return {m: adapter.delta(m) for m in adapter.factors}


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("fedsb", {}),
        ("hello", {"hello_budget": [1, 2], "hello_pattern": "fisher"}),
        ("legend", {"capabilities": [0.5, 1.0], "r": 4}),
    ],
)
def test_a_server_killed_mid_round_resumes_to_the_uninterrupted_adapter(
    tmp_path, model_dir, monkeypatch, method, settings
):
    """Round 2 dies before its checkpoint (the server process killed while clients train);
    a new server resumes from round 1's checkpoint and ends where an unbroken run ends."""
    data = datas(tmp_path, 2)

    def run(name: str):
        return tiny_config(
            tmp_path,
            model_dir,
            method=method,
            rounds=3,
            output_dir=str(tmp_path / name),
            **settings,
        )

    whole = run("whole")
    run_rounds(FedServer(whole, load_model(whole.model)), data, until=3)
    broken = run("broken")
    run_rounds(FedServer(broken, load_model(broken.model)), data, until=1)
    dies_at(monkeypatch, {2})
    with pytest.raises(Killed):  # the server is gone with its in-memory state
        run_rounds(FedServer(broken, load_model(broken.model), resume=True), data, until=2)
    monkeypatch.undo()
    resumed = FedServer(broken, load_model(broken.model), resume=True)
    assert resumed.round == 1
    lines = run_rounds(resumed, data, until=3)
    assert [line["round"] for line in lines] == [2, 3]
    a, b = final_adapter(whole.output), final_adapter(broken.output)
    assert a.keys() == b.keys()
    for module in a:
        assert torch.allclose(a[module], b[module], atol=1e-6)


def test_exact_methods_stay_exact_over_the_replies_received(tmp_path, model_dir, monkeypatch):
    """FLoRA with mixed ranks, the middle client lost: the two replies stack exactly."""
    config = tiny_config(
        tmp_path, model_dir, method="flora", clients=3, min_clients=1, client_ranks=[1, 2, 3]
    )
    dies_at(monkeypatch, {3})  # client 1's first step
    server = FedServer(config, load_model(config.model))
    line = run_rounds(server, datas(tmp_path), until=1, lost=Killed)[0]
    assert line["clients"] == 2 and line["aggregation_error"] < 1e-6
    (pair,) = next(iter(server.state.values())).folded
    assert pair[0].shape[0] == 1 + 3  # the ranks of clients 0 and 2

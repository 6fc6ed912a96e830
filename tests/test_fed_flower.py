"""The Flower smoke test: `rankwise fed simulate` with 2 clients, 2 rounds, on a tiny model.

It runs the real thing (a private SuperLink, Ray actors, the ClientApp and ServerApp) and
checks that every process it started is gone afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fed_support import word_data

from rankwise.adapters import read_adapter
from rankwise.cli import main

pytest.importorskip("flwr")
pytest.importorskip("ray")

FLOWER_PROCESSES = ("flower-superlink", "flwr-simulation", "flwr-serverapp", "raylet", "gcs_server")


def flower_pids() -> set[int]:
    """Processes on this machine running a Flower or Ray program (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(name in command for name in FLOWER_PROCESSES):
            found.add(int(entry.name))
    return found


def simulate(tmp_path, model_dir, method: str, *flags: str) -> list[dict]:
    """`rankwise fed simulate` with 2 clients and 2 rounds; its metrics lines."""
    code = main(
        [
            "fed",
            "simulate",
            "--model", str(model_dir),
            "--data", word_data(tmp_path / "train.jsonl", 24, 0),
            "--eval-data", word_data(tmp_path / "val.jsonl", 8, 1),
            "--output-dir", str(tmp_path / "run"),
            "--method", method,
            "--max-steps", "2",
            "--batch-size", "4",
            "--warmup-steps", "0",
            "--seq-len", "16",
            "--clients", "2",
            "--rounds", "2",
            *flags,
        ]
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["clients"] == 2 and line["failed_replies"] == 0
        assert line["uplink_bytes"] == line["uplink_bytes_analytic"] > 0
        assert line["downlink_bytes"] == line["downlink_bytes_analytic"] > 0
    return lines


def test_simulate_two_clients_two_rounds(tmp_path, model_dir):
    before = flower_pids()
    lines = simulate(tmp_path, model_dir, "fedsb", "--r", "2")
    assert all(line["aggregation_error"] < 1e-6 for line in lines)
    # Fed-SB: B and A go down once, then only R travels
    assert lines[1]["downlink_bytes"] < lines[0]["downlink_bytes"]
    run = tmp_path / "run"
    assert read_adapter(run / "adapter").factors
    assert (run / "rounds.png").is_file()
    assert flower_pids() <= before


def test_clients_of_different_depths_and_ranks(tmp_path, model_dir):
    """LEGEND's clients send different modules at different ranks: Flower must pass them on."""
    before = flower_pids()
    simulate(tmp_path, model_dir, "legend", "--r", "4", "--capabilities", "0.5,1.0")
    adapter = read_adapter(tmp_path / "run" / "adapter")
    assert {a.shape[0] for a, _ in adapter.factors.values()} == {2, 4}  # global ranks per block
    assert flower_pids() <= before

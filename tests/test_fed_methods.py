"""Federated aggregation as pure functions: exactness, FedIT's error, bytes (no Flower)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.fed import (
    METHODS,
    ClientUpdate,
    ModuleState,
    aggregation_error,
    get_method,
    normalised,
    payload_bytes,
)
from rankwise.fed.base import npy_bytes, state_from_flat
from rankwise.fed.fedsb import fedsb_init

SHAPES = {"layers.0.q": (12, 16), "layers.1.up": (24, 16)}  # module -> (out, in)
WEIGHTS = normalised([1.0, 2.0, 5.0])


def random_state(method: str, rank: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out, fan_in) in SHAPES.items():
        parts = {
            "A": torch.randn(rank, fan_in, generator=g),
            "B": torch.randn(out, rank, generator=g),
        }
        if method == "fedsb":
            parts["R"] = torch.randn(rank, rank, generator=g)
        if method == "flora":
            parts = {}
        folded = [(torch.randn(2, fan_in, generator=g), torch.randn(out, 2, generator=g))]
        state[module] = ModuleState(parts, 0.5, folded)
    return state


def random_updates(method: str, state, ranks=(4, 4, 4), seed: int = 1):
    """Each client's trained factors: random where the method trains, the global's elsewhere."""
    g = torch.Generator().manual_seed(seed)
    updates = []
    for rank in ranks:
        parts, scales = {}, {}
        for module, (out, fan_in) in SHAPES.items():
            mine = dict(state[module].parts)
            for part in METHODS[method].trains:
                shape = {"A": (rank, fan_in), "B": (out, rank), "R": (rank, rank)}[part]
                mine[part] = torch.randn(*shape, generator=g)
            parts[module], scales[module] = mine, 8.0 / rank
            if method != "flora":
                scales[module] = state[module].scale
        updates.append(ClientUpdate(parts, scales, 1.0))
    return updates


@pytest.mark.parametrize("method", ["fedex", "ffa", "flora", "fedsb"])
def test_exact_methods_aggregate_the_mean_update(method):
    ranks = (2, 5, 3) if method == "flora" else (4, 4, 4)
    state = random_state(method)
    updates = random_updates(method, state, ranks)
    new = get_method(method).aggregate(state, updates, WEIGHTS)
    assert aggregation_error(state, new, updates, WEIGHTS) < 1e-6


def test_fedit_error_is_large():
    state = random_state("fedit")
    updates = random_updates("fedit", state)
    new = get_method("fedit").aggregate(state, updates, WEIGHTS)
    assert aggregation_error(state, new, updates, WEIGHTS) > 0.1


def test_fedit_is_exact_for_one_client():
    state = random_state("fedit")
    updates = random_updates("fedit", state, ranks=(4,))
    new = get_method("fedit").aggregate(state, updates, [1.0])
    assert aggregation_error(state, new, updates, [1.0]) < 1e-6


def test_averaging_methods_refuse_mixed_ranks():
    state = random_state("fedex")
    updates = random_updates("fedex", state, ranks=(2, 4, 4))
    with pytest.raises(RankwiseError, match="flora stacks mixed ranks"):
        get_method("fedex").aggregate(state, updates, WEIGHTS)


def test_weights_are_checked():
    with pytest.raises(RankwiseError, match="non-negative"):
        normalised([0.0, 0.0])


@pytest.mark.parametrize("shape", [(3,), (4, 8), (1000, 17), (2, 3, 5)])
def test_npy_bytes_match_numpy(shape):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, np.float32), allow_pickle=False)
    assert npy_bytes(shape) == len(buffer.getvalue())


def test_payload_bytes_equal_flower_count_bytes():
    flwr_app = pytest.importorskip("flwr.app")
    state = random_state("fedex")
    payload = get_method("fedex").downlink(state)
    record = flwr_app.ArrayRecord(dict(payload))
    assert payload_bytes(payload) == record.count_bytes()


def test_downlink_round_trips():
    state = random_state("fedex")
    flat = get_method("fedex").downlink(state)
    back = state_from_flat(flat, {m: s.scale for m, s in state.items()})
    for module, ms in state.items():
        zeros = torch.zeros(SHAPES[module], dtype=torch.float64)
        assert torch.allclose(back[module].delta(zeros), ms.delta(zeros))


def fedsb_bytes(rank: int, clients: int, width: int) -> int:
    """One client's uplink of Fed-SB on a model of this width."""
    global SHAPES
    saved, SHAPES = SHAPES, {"m0": (width, width), "m1": (2 * width, width)}
    try:
        state = random_state("fedsb", rank=rank)
        updates = random_updates("fedsb", state, ranks=(rank,) * clients)
        return payload_bytes(get_method("fedsb").uplink(updates[0]))
    finally:
        SHAPES = saved


def test_fedsb_bytes_do_not_grow_with_clients_or_width():
    base = fedsb_bytes(4, 2, 16)
    assert fedsb_bytes(4, 7, 16) == base
    assert fedsb_bytes(4, 2, 64) == base
    # r² numbers per module (plus headers and keys), not r (in + out) as LoRA's factors
    assert base == sum(npy_bytes((4, 4)) + len(f"{m}|R") for m in ("m0", "m1"))


def test_fedsb_sends_less_than_fedit():
    state = random_state("fedit")
    update = random_updates("fedit", state)[0]
    fedit = payload_bytes(get_method("fedit").uplink(update))
    assert fedsb_bytes(4, 2, 16) < fedit


def test_fedsb_init_takes_the_gradient_svd():
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(12, 3, generator=g))[0]
    v = torch.linalg.qr(torch.randn(16, 3, generator=g))[0]
    gradient = u @ torch.diag(torch.tensor([5.0, 3.0, 1.0])) @ v.T
    state = fedsb_init([{"m": gradient}, {"m": gradient}], [0.5, 0.5], rank=3, scale=1.0)
    ms = state["m"]
    projection = ms.parts["B"] @ ms.parts["B"].T @ gradient @ ms.parts["A"].T @ ms.parts["A"]
    assert torch.allclose(projection, gradient, atol=1e-5)
    assert torch.count_nonzero(ms.parts["R"]) == 0


def test_fed_verbs_say_how_to_install_flower(monkeypatch, capsys):
    import importlib.util

    from rankwise.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a)
    )
    assert main(["fed", "simulate", "--clients", "2"]) == 2
    assert "pip install 'rankwise[fed]'" in capsys.readouterr().err


def test_example_fed_config_gives_one_client_per_task():
    from pathlib import Path

    from rankwise.configfile import load_yaml
    from rankwise.data.tasks import TASKS
    from rankwise.fed.config import FedConfig

    root = Path(__file__).resolve().parent.parent
    config = FedConfig.from_mapping(load_yaml(root / "examples" / "fed.yaml"))
    assert config.partition == "task" and config.clients == len(TASKS)

"""Fed-HeLLo's and LEGEND's allocation and aggregation as pure functions (no Flower, no model)."""

from __future__ import annotations

import pytest
import torch

from rankwise.fed import ClientUpdate, ModuleState, aggregation_error, get_method, normalised
from rankwise.fed.base import payload_bytes
from rankwise.fed.config import FedConfig
from rankwise.fed.hello import GEOMETRIC, pattern_layers, top_layers
from rankwise.fed.legend import legend_ranks

BLOCKS = 4
MODULES = {f"model.layers.{i}.{kind}": (12, 16) for i in range(BLOCKS) for kind in ("q", "up")}
WEIGHTS = normalised([1.0, 2.0, 5.0])


def random_state(rank: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        m: ModuleState(
            {"A": torch.randn(rank, fan_in, generator=g), "B": torch.randn(out, rank, generator=g)},
            0.5,
        )
        for m, (out, fan_in) in MODULES.items()
    }


def update(ranks: dict[str, int], seed: int) -> ClientUpdate:
    """A client's factors on the modules it trained, at its rank there."""
    g = torch.Generator().manual_seed(seed)
    parts = {
        m: {
            "A": torch.randn(r, MODULES[m][1], generator=g),
            "B": torch.randn(MODULES[m][0], r, generator=g),
        }
        for m, r in ranks.items()
    }
    return ClientUpdate(parts, dict.fromkeys(ranks, 0.5), 1.0)


def config(**values) -> FedConfig:
    return FedConfig.from_mapping({"r": 4, "lora_alpha": 8.0, **values})


def no_scores() -> dict[str, float]:
    raise AssertionError("a geometric pattern measures no gradient")


def test_hello_averages_a_block_over_only_the_clients_that_trained_it():
    state = random_state()
    q0, up3, q1 = "model.layers.0.q", "model.layers.3.up", "model.layers.1.q"
    updates = [update({q0: 4, up3: 4}, 1), update({q0: 4}, 2), update({up3: 4}, 3)]
    new = get_method("hello").aggregate(state, updates, WEIGHTS)
    p = WEIGHTS
    for module, who in ((q0, (0, 1)), (up3, (0, 2))):
        total = sum(p[k] for k in who)
        for part in "AB":
            expected = sum(p[k] / total * updates[k].parts[module][part] for k in who)
            assert torch.allclose(new[module].parts[part], expected)
    assert torch.equal(new[q1].parts["A"], state[q1].parts["A"])  # nobody trained block 1


@pytest.mark.parametrize(
    ("pattern", "client", "expected"),
    [
        ("triangle", 0, [0, 1, 2]),
        ("inverted_triangle", 0, [5, 6, 7]),
        ("bottleneck", 0, [0, 1, 7]),
        ("uniform", 0, [0, 2, 5]),
        ("uniform", 1, [1, 3, 6]),
    ],
)
def test_geometric_patterns_pick_the_stated_blocks(pattern, client, expected):
    assert pattern_layers(pattern, 8, 3, client) == expected
    assert pattern_layers(pattern, 2, 3, client) == [0, 1]  # a budget above the depth: all


def counts(pattern: str, budgets: list[int], blocks: int = 8) -> list[int]:
    """How many clients train each block (the pattern's collective shape)."""
    found = [0] * blocks
    for k, budget in enumerate(budgets):
        chosen = pattern_layers(pattern, blocks, budget, k)
        assert len(chosen) == len(set(chosen)) == budget
        for i in chosen:
            found[i] += 1
    return found


def test_geometric_patterns_give_their_collective_shapes():
    budgets = [1, 2, 3, 4, 5, 6, 7, 8]
    triangle = counts("triangle", budgets)
    assert triangle == sorted(triangle, reverse=True) and triangle[0] > triangle[-1]
    inverted = counts("inverted_triangle", budgets)
    assert inverted == sorted(inverted) and inverted[-1] > inverted[0]
    bottleneck = counts("bottleneck", budgets)
    assert min(bottleneck[0], bottleneck[-1]) > max(bottleneck[3], bottleneck[4])
    assert set(counts("uniform", [3] * 8)) == {3}  # every block trained equally often
    assert set(GEOMETRIC) == {"triangle", "inverted_triangle", "bottleneck", "uniform"}


def test_fisher_pattern_picks_the_highest_scoring_blocks():
    assert top_layers([0.1, 5.0, 0.3, 2.0], 2) == [1, 3]
    per_block = [1.0, 7.0, 3.0, 5.0]  # a block's score is the sum of its modules'
    scores = {m: per_block[int(m.split(".")[2])] / 2 for m in MODULES}
    scores["model.layers.2.q"] += 4.5  # block 2 now scores 7.5, above block 1
    lora = get_method("hello").local_lora(
        config(method="hello", hello_budget=[2]), 0, list(MODULES), lambda: scores
    )
    assert sorted(lora.target_modules) == sorted(m for m in MODULES if m.split(".")[2] in "12")
    assert all(lora.expert_for(m).rank == 4 for m in lora.target_modules)


def test_hello_geometric_local_adapter_follows_the_budget():
    lora = get_method("hello").local_lora(
        config(method="hello", hello_budget=[1, 3], hello_pattern="inverted_triangle"),
        1,
        list(MODULES),
        no_scores,
    )
    assert sorted(lora.target_modules) == sorted(m for m in MODULES if ".0." not in m)


def test_legend_depth_and_ranks_grow_with_capability_and_toward_the_output():
    grid = [0.1, 0.25, 0.5, 0.75, 1.0]
    for blocks in (1, 4, 30):
        for rank in (1, 8, 16):
            profiles = [legend_ranks(c, blocks, rank) for c in grid]
            for low, high in zip(profiles, profiles[1:], strict=False):
                assert set(low) <= set(high)  # depth: a prefix from the output
                assert all(low[i] <= high[i] for i in low)
            for ranks in profiles:
                assert max(ranks) == blocks - 1  # counted from the output
                ordered = [ranks[i] for i in sorted(ranks)]
                assert ordered == sorted(ordered) and min(ordered) >= 1
            assert len(profiles[-1]) == blocks and profiles[-1][blocks - 1] == rank


def test_legend_clients_fit_under_the_global_adapter():
    method, cfg = get_method("legend"), config(method="legend", capabilities=[0.25, 1.0])
    whole = method.global_lora(cfg, list(MODULES))
    assert sorted(whole.target_modules) == sorted(MODULES)
    scales = set()
    for k in range(2):
        local = method.local_lora(cfg, k, list(MODULES), no_scores)
        for m in local.target_modules:
            spec, top = local.expert_for(m), whole.expert_for(m)
            assert spec.rank <= top.rank
            scales |= {round(spec.scaling, 12), round(top.scaling, 12)}
    assert scales == {2.0}  # alpha / r at every rank: a row means the same everywhere
    small = method.local_lora(cfg, 0, list(MODULES), no_scores).target_modules
    assert sorted(small) == ["model.layers.3.q", "model.layers.3.up"]


def test_legend_averages_each_rank_row_over_its_holders():
    state = random_state(rank=4)
    m = "model.layers.3.q"
    updates = [update({m: 4}, 1), update({m: 2}, 2), update({m: 1}, 3)]
    new = get_method("legend").aggregate(state, updates, WEIGHTS)[m].parts
    p = WEIGHTS
    for row in range(4):
        holders = [k for k in range(3) if updates[k].parts[m]["A"].shape[0] > row]
        total = sum(p[k] for k in holders)
        a = sum(p[k] / total * updates[k].parts[m]["A"][row] for k in holders)
        b = sum(p[k] / total * updates[k].parts[m]["B"][:, row] for k in holders)
        assert torch.allclose(new["A"][row], a) and torch.allclose(new["B"][:, row], b)


@pytest.mark.parametrize(("method", "rank"), [("hello", 4), ("legend", 2), ("legend", 1)])
def test_one_client_on_some_modules_is_aggregated_exactly(method, rank):
    state = random_state(rank=4)
    updates = [update({"model.layers.1.q": rank, "model.layers.3.up": rank}, 4)]
    new = get_method(method).aggregate(state, updates, [1.0])
    assert aggregation_error(state, new, updates, [1.0]) < 1e-6
    many = [updates[0], update({"model.layers.1.q": 4}, 5), update({"model.layers.3.up": 4}, 6)]
    new = get_method(method).aggregate(state, many, WEIGHTS)
    assert aggregation_error(state, new, many, WEIGHTS) > 0.01  # FedAvg's cross terms


@pytest.mark.parametrize("method", ["hello", "legend"])
def test_uplink_holds_only_the_trained_modules_and_bytes_match_flower(method):
    flwr_app = pytest.importorskip("flwr.app")
    state = random_state(rank=4)
    mine = update({"model.layers.2.q": 2 if method == "legend" else 4, "model.layers.3.q": 4}, 7)
    payload = get_method(method).uplink(mine)
    assert {k.partition("|")[0] for k in payload} == {"model.layers.2.q", "model.layers.3.q"}
    assert payload_bytes(payload) == flwr_app.ArrayRecord(dict(payload)).count_bytes()
    down = get_method(method).downlink(state)
    assert payload_bytes(down) == flwr_app.ArrayRecord(dict(down)).count_bytes()
    back = get_method(method).from_uplink(state, payload, 0.5, 3.0)
    assert set(back.parts) == {"model.layers.2.q", "model.layers.3.q"}
    assert back.weight == 3.0


def test_allocation_settings_belong_to_their_method():
    from rankwise.errors import RankwiseError

    with pytest.raises(RankwiseError, match="hello_budget is a setting of method hello"):
        config(method="fedit", hello_budget=[2])
    with pytest.raises(RankwiseError, match=r"capabilities must be in \(0, 1\]"):
        config(method="legend", capabilities=[0.0])

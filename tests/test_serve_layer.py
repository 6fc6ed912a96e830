"""The slot layer and its plans: slot s of a sequence adds s B_s A_s x, for one forward only."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from rankwise.adapters.inject import swap_modules
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.serve.layer import SlotLinear
from rankwise.serve.plans import Planner

CPU = torch.device("cpu")


def conv1d(fan_in: int, fan_out: int) -> Conv1D:
    layer = Conv1D(fan_out, fan_in)  # GPT-2's argument order: (out, in); weight [in, out]
    torch.nn.init.normal_(layer.weight)
    return layer


@pytest.mark.parametrize("make_base", [torch.nn.Linear, conv1d])
@pytest.mark.parametrize("strategy", ["auto", "grouped", "gathered"])
def test_each_sequence_gets_its_slots_adapter(make_base, strategy):
    torch.manual_seed(0)
    base = make_base(12, 10)
    planner = Planner(CPU, strategy)
    layer = SlotLinear(base, slots=4, rank=3, planner=planner)
    # (A [r, in], s B^T [r, out]); slot 3 holds a rank-2 adapter, zero-padded to rank 3
    factors = {
        1: (torch.randn(3, 12), torch.randn(3, 10)),
        3: (torch.randn(2, 12), torch.randn(2, 10)),
    }
    for slot, (a, bt) in factors.items():
        layer.load(slot, (a, bt))
    slots = [3, 0, 1, 3]
    x = torch.randn(len(slots), 5, 12)
    with planner.forward(slots, 5):
        y = layer(x)
    for i, slot in enumerate(slots):
        expected = base(x[i])
        if slot:
            a, bt = factors[slot]
            expected = expected + (x[i] @ a.T) @ bt
        assert torch.allclose(y[i], expected, atol=1e-5)


def test_a_slot_equals_the_training_layer_with_the_same_adapter():
    base = torch.nn.Linear(12, 10)
    experts = LowRankExperts(base, [ExpertSpec(rank=4, alpha=8.0)])
    torch.nn.init.normal_(experts.lora_B)
    planner = Planner(CPU)
    layer = SlotLinear(base, slots=2, rank=4, planner=planner)
    scaling = experts.experts[0].scaling
    layer.load(1, (experts.lora_A.detach(), (scaling * experts.lora_B.detach()).T))
    x = torch.randn(2, 3, 12)
    with torch.no_grad(), planner.forward([1, 1], 3):
        assert torch.allclose(layer(x), experts(x), atol=1e-6)
    layer.load(1, None)
    with torch.no_grad(), planner.forward([1, 1], 3):
        assert torch.equal(layer(x), base(x))


def test_the_plan_lives_for_one_forward_only():
    planner = Planner(CPU)
    layer = SlotLinear(torch.nn.Linear(4, 4), slots=2, rank=2, planner=planner)
    with pytest.raises(RuntimeError, match="outside Planner.forward"):
        layer(torch.randn(1, 1, 4))
    with pytest.raises(ValueError), planner.forward([0], 1):
        raise ValueError("the forward failed")
    assert planner.plan is None
    with planner.forward([0], 1), pytest.raises(RuntimeError, match="already running"):
        with planner.forward([0], 1):
            pass


def test_swap_modules_returns_what_it_replaced():
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    inner = model[0][0]
    new = torch.nn.Identity()
    assert swap_modules(model, {"0.0": new}) == {"0.0": inner}
    assert model[0][0] is new

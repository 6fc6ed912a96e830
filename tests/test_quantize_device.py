"""The quantize pillar makes every tensor on the model's device (proven on a CPU-only machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from architectures import tiny_model
from device_discipline import FactoryRecorder

import rankwise.quantize
from rankwise.adapters import LoraConfig, inject_adapter
from rankwise.quantize import BASES, quantize_model
from rankwise.quantize.compensate import compensate
from rankwise.quantize.l4q import export_l4q
from rankwise.quantize.loftq import LoftQ
from rankwise.quantize.lqlora import LQLoRA

QUANTIZE = Path(rankwise.quantize.__file__).parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_quantising_and_compensating_create_nothing_on_the_default_device(arch):
    tokens = torch.tensor([[3, 4, 5, 6]])
    reference = tiny_model(arch)
    with FactoryRecorder(QUANTIZE) as recorder:
        model = tiny_model(arch)
        quantize_model(model, BASES["nf3"], 32)
        model(tokens)
        LoftQ(bits=2, rank=2, iters=2).quantize(tiny_model(arch), 32)
        compensate(model, reference, "eora", 2, 4.0, tokens)
        lq = LQLoRA(bits_budget=6.0, bits_choices=[2, 4], block_choices=[16], rank=2, iters=2,
                    fisher=True)  # fmt: skip
        lq.quantize(tiny_model(arch), 32, tokens)
        l4q = tiny_model(arch)
        inject_adapter(l4q, LoraConfig(r=2, l4q_bits=3, l4q_group=16))
        export_l4q(l4q)
        l4q(tokens)
    assert recorder.events == []

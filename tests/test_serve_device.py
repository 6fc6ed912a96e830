"""Device discipline without a GPU: everything the engine creates lives on the model's device.

No GPU exists here, so two things stand in for a CUDA run. (1) Every tensor factory called
from ``src/rankwise/serve/`` during a full workload (prefill, decode, rows leaving, a cold
adapter loaded into a slot, greedy and seeded sampling) names its device: anything left to the
default would land on the CPU while the model sits on CUDA. (2) The same workload runs with
torch's default device set to ``meta``, so a tensor created anywhere in a step without a device
(ours or transformers') would be a meta tensor and the step would fail; the texts must equal a
normal run's. The devices named are the model's (``Engine.device``, from its parameters), as the
buffers and generators checked at the end show. What this cannot show: CUDA-only behaviour
(kernels, streams, bf16 numerics), which needs a GPU run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from device_discipline import FactoryRecorder, on_meta_by_default
from test_serve_support import (
    random_adapter,
    tiny_model,
    tiny_tokenizer,
)

import rankwise.serve
from rankwise.serve.engine import Engine, EngineConfig
from rankwise.serve.requests import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")

SERVE = Path(rankwise.serve.__file__).parent
TOKENIZER = tiny_tokenizer()


def workload() -> tuple[Engine, list[GenerationRequest]]:
    """An engine with 3 adapters but 2 hot slots, and requests that leave at different steps."""
    engine = Engine(tiny_model(len(TOKENIZER)), TOKENIZER, EngineConfig(hot_slots=2, max_rank=4))
    for i in range(3):
        engine.register(f"a{i}", random_adapter(tiny_model(len(TOKENIZER)), i, targets=None))
    requests = [
        GenerationRequest(
            TOKENIZER(f"prompt {i} " * (i + 1))["input_ids"],
            None if i == 4 else f"a{i % 3}",
            max_tokens=3 + i,
            temperature=0.8 if i % 2 else 0.0,
            seed=i,
            ignore_eos=True,
        )
        for i in range(6)
    ]
    return engine, requests


def test_every_tensor_the_engine_makes_names_the_models_device():
    engine, requests = workload()
    expected = engine.generate(requests)
    seen_generators = []
    step = engine.step

    def step_and_look() -> bool:
        seen_generators.extend(s.generator for s in engine.running if s.generator is not None)
        return step()

    engine.step = step_and_look
    calls = FactoryRecorder(SERVE)
    with calls:
        texts = on_meta_by_default(engine.generate)(requests)
    assert calls.events == []
    assert texts == expected
    assert engine.pool.load_times and len(engine.pool.load_times) > 2  # slots were reloaded
    assert seen_generators and all(g.device == engine.device for g in seen_generators)
    buffers = [b for layer in engine.pool.layers.values() for b in (layer.a, layer.bt)]
    buffers += [engine.runner.cache.valid] + [x.keys for x in engine.runner.cache.layers]
    assert all(b.device == engine.device for b in buffers)

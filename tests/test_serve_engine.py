"""The batched multi-adapter engine, in process: batching never changes a greedy result."""

from __future__ import annotations

import pytest
import torch
from test_serve_support import (
    greedy_text,
    random_adapter,
    tiny_model,
    tiny_tokenizer,
)

from rankwise import RankwiseError
from rankwise.adapters.attach import attach_adapters
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.serve.engine import Engine, EngineConfig
from rankwise.serve.kv import swap_remove
from rankwise.serve.plans import plan_auto
from rankwise.serve.requests import GenerationRequest, Overloaded, UnknownModel
from rankwise.serve.text import TextStream

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER = tiny_tokenizer()
PROMPTS = [
    "Hello there",
    "The quick brown fox",
    "a",
    "Once upon a time, in a land",
    "xyz",
    "Hi",
    "Testing 123",
    "Lorem ipsum dolor",
]


def adapters(model: torch.nn.Module) -> list:
    """Five adapters: ranks 2, 4, 6 (one with a rank pattern), different target modules."""
    return [
        random_adapter(model, 10, rank=2, targets=("q_proj", "v_proj")),
        random_adapter(model, 11, rank=4, targets=("q_proj", "v_proj", "down_proj")),
        random_adapter(model, 12, rank=6, targets=("k_proj", "o_proj", "up_proj")),
        random_adapter(
            model,
            13,
            rank=4,
            targets=("q_proj", "gate_proj"),
            rank_pattern={"gate_proj": 2},
            alpha=3.0,
        ),
        random_adapter(model, 14, rank=2, targets=("v_proj",)),
    ]


def make_engine(strategy: str = "auto", **config) -> Engine:
    model = tiny_model(len(TOKENIZER))
    engine = Engine(model, TOKENIZER, EngineConfig(max_rank=8, strategy=strategy, **config))
    for i, weights in enumerate(adapters(model)):
        engine.register(f"a{i}", weights)
    return engine


def request(i: int, adapter: str | None, max_tokens: int = 12, **kwargs) -> GenerationRequest:
    prompt = TOKENIZER(PROMPTS[i % len(PROMPTS)])["input_ids"]
    return GenerationRequest(prompt, adapter, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def reference(adapter: int | None, prompt: list[int], n: int) -> str:
    """Greedy text from the plain model with the adapter attached the ordinary way."""
    model = tiny_model(len(TOKENIZER))
    if adapter is not None:
        attach_adapters(model, [adapters(model)[adapter]])
    return greedy_text(model, TOKENIZER, prompt, n)


MIXED = [request(i, None if i % 6 == 5 else f"a{i % 5}") for i in range(8)]


@pytest.mark.parametrize("strategy", ["auto", "grouped", "gathered"])
def test_mixed_batch_equals_each_request_alone(strategy):
    engine = make_engine(strategy)
    together = engine.generate(MIXED)
    alone = [engine.generate([r])[0] for r in MIXED]
    assert together == alone
    expected = [
        reference(None if r.adapter is None else int(r.adapter[1:]), r.prompt, 12) for r in MIXED
    ]
    assert together == expected
    assert len(set(together)) > 4  # the adapters really differ


def test_requests_join_and_leave_between_steps():
    engine = make_engine(max_batch=4)
    texts: dict[int, str] = {}
    requests = [request(i, f"a{i % 5}" if i % 3 else None, max_tokens=3 + 2 * i) for i in range(8)]

    def submit(i: int) -> None:
        texts[i] = ""
        engine.submit(requests[i], lambda e, i=i: texts.__setitem__(i, texts[i] + e.text))

    for i in range(3):
        submit(i)
    engine.step()
    for i in range(3, 8):  # join while the first ones decode; some wait for a free row
        submit(i)
        engine.step()
    while engine.step():
        pass
    assert [texts[i] for i in range(8)] == [engine.generate([r])[0] for r in requests]


def test_adapters_beyond_the_hot_slots_load_on_demand():
    engine = make_engine(hot_slots=2)
    texts = engine.generate(MIXED)
    assert texts == make_engine().generate(MIXED)
    assert len(engine.pool.load_times) > 2  # slots were reused for other adapters
    assert all(not pins for pins in engine.pool.pins)


def test_seeded_sampling_does_not_depend_on_the_batch():
    engine = make_engine()
    sampled = [request(i, f"a{i % 5}", temperature=0.9, top_p=0.8, seed=i) for i in range(6)]
    assert engine.generate(sampled) == [engine.generate([r])[0] for r in sampled]


def test_stop_strings_end_the_text_before_them():
    engine = make_engine()
    full = engine.generate([request(1, "a1", max_tokens=20)])[0]
    stop = full[5:7]
    cut = engine.generate([request(1, "a1", max_tokens=20, stop=(stop,))])[0]
    assert cut == full[: full.index(stop)]


def test_submit_refuses_unknown_models_and_limits():
    engine = make_engine(max_batch=2, max_queued=1, max_prompt_tokens=20)
    with pytest.raises(UnknownModel, match="'nope' does not exist"):
        engine.submit(request(0, "nope"), print)
    with pytest.raises(RankwiseError, match="at most 20"):
        engine.submit(GenerationRequest(list(range(3, 30)), None), print)
    with pytest.raises(RankwiseError, match="context of 256"):
        engine.submit(GenerationRequest([5] * 20, None, max_tokens=250), print)
    with pytest.raises(RankwiseError, match="max_tokens must be between"):
        engine.submit(request(0, None, max_tokens=0), print)
    for _ in range(3):
        engine.submit(request(0, None), lambda e: None)
    with pytest.raises(Overloaded, match="too many requests"):
        engine.submit(request(0, None), lambda e: None)


def test_register_validates_against_the_base_model():
    engine = make_engine(max_batch=2)
    other = tiny_model(len(TOKENIZER))
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 48, bias=False)
    with pytest.raises(RankwiseError, match="does not fit this model"):
        engine.register("bad", random_adapter(other, 0, targets=("q_proj",)))
    with pytest.raises(RankwiseError, match="max rank 8"):
        engine.register("big", random_adapter(tiny_model(len(TOKENIZER)), 0, rank=16))
    assert "bad" not in engine.adapters and "big" not in engine.adapters


def test_cancelled_and_unregistered_requests_leave_cleanly():
    engine = make_engine(max_batch=4)
    tickets = [engine.submit(request(i, f"a{i}", max_tokens=50), lambda e: None) for i in range(4)]
    engine.step()
    tickets[1].cancel()
    engine.unregister("a2")  # already running: it still finishes
    engine.step()
    assert len(engine.running) == 3
    while engine.step():
        pass
    assert not engine.running and sum(engine.pool.pins) == 0
    with pytest.raises(UnknownModel):
        engine.submit(request(0, "a2"), print)


def test_swap_remove_keeps_every_other_row():
    for rows in range(1, 8):
        for mask in range(1 << rows):
            leaving = {i for i in range(rows) if mask >> i & 1}
            order = swap_remove(rows, leaving)
            assert sorted(order) == sorted(set(range(rows)) - leaving)


def test_text_stream_holds_back_a_possible_stop_string():
    stream = TextStream(TOKENIZER, stops=["END"])
    pieces = []
    for ch in "abcEN":
        stream.push(TOKENIZER.convert_tokens_to_ids(ch))
        pieces.append(stream.take()[0])
    assert "".join(pieces) == "abc"  # "EN" could still become "END"
    stream.push(TOKENIZER.convert_tokens_to_ids("D"))
    assert stream.take() == ("", True)


@pytest.mark.parametrize(
    ("slots", "kinds"),
    [
        ([5] * 6, ["Grouped"]),
        ([1, 2, 3, 4, 5, 6], ["SlotMajor"]),
        ([6, 5, 4, 3, 2, 1], ["SlotMajor"]),
        ([0, 3, 0, 3], ["SlotMajor"]),  # 6 tokens: a block of 6 rows beats a part (8)
        ([1, 2, 3, 4, 5, 6] + [7] * 12, ["Grouped", "SlotMajor"]),
        ([4, 1, 1, 2], ["Grouped", "SlotMajor"]),  # slots 2 and 4 pad the block (slot 3)
        ([0, 0], []),
    ],
)
def test_auto_plan_splits_by_cost_and_matches_per_token_products(slots, kinds):
    layer = LowRankExperts(torch.nn.Linear(12, 10), [ExpertSpec(4, 4.0)] * 8)
    torch.nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.lora_A[:4].zero_()
        layer.lora_B[:, :4].zero_()  # slot 0: the bare base model
    plan = plan_auto(slots, 3, torch.device("cpu"))
    assert [type(p).__name__ for p in getattr(plan, "parts", [])] == kinds
    x = torch.randn(len(slots), 3, 12)
    a, bt = layer.lora_A.view(8, 4, 12), layer.lora_B.T.view(8, 4, 10)
    expected = torch.stack([(x[i] @ a[s].T) @ bt[s] for i, s in enumerate(slots)])
    out = plan(x, a, bt, torch.zeros(len(slots) * 3, 10)).view(expected.shape)
    assert torch.allclose(out, expected, atol=1e-6)

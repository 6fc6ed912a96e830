"""Shutting down under load: every request in flight gets a complete answer, and exit status 0."""

from __future__ import annotations

import json
import threading

import httpx
import torch
from test_serve_support import (
    Server,
    tiny_model,
    tiny_tokenizer,
    wait_for,
    write_adapters,
    write_tiny_model,
)

from rankwise.serve.engine import Engine, EngineConfig
from rankwise.serve.requests import Chunk, Failure, GenerationRequest
from rankwise.serve.worker import EngineThread

REQUESTS = 40


def test_sigterm_during_a_burst_answers_every_request(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    write_adapters(tmp_path / "adapters", model, 2)
    server = Server(tmp_path, "--max-batch", "4", "--max-queued", "64", "--scan-interval", "0")
    answers: list[tuple[int, list[str]] | Exception | None] = [None] * REQUESTS
    http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=REQUESTS))

    def call(i: int) -> None:
        body = {
            "model": ("model", "a0", "a1")[i % 3],
            "prompt": f"Request number {i}",
            "max_tokens": 150,  # 10 batches of 4 x 150 steps: most still wait at SIGTERM
            "temperature": 0,
            "stream": i % 2 == 1,
        }
        try:
            with http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                answers[i] = (r.status_code, [line for line in r.iter_lines() if line])
        except httpx.HTTPError as err:  # a dropped connection, a reset, a timeout
            answers[i] = err

    clients = [threading.Thread(target=call, args=(i,)) for i in range(REQUESTS)]
    for client in clients:
        client.start()

    def all_submitted() -> bool:
        answered = sum(a is not None for a in answers)  # read before the engine's counts
        health = http.get(f"{server.url}/health").json()
        return answered + health["running"] + health["waiting"] >= REQUESTS

    wait_for(all_submitted, timeout=30)
    assert server.stop() == 0, server.log.read_text()
    for client in clients:
        client.join(timeout=30)
    http.close()
    finished = refused = 0
    for i, answer in enumerate(answers):
        assert isinstance(answer, tuple), f"request {i}: {answer!r}"
        status, lines = answer
        if i % 2:  # streamed: a 200 whose events end in [DONE], after a finish or an error
            assert status == 200 and lines[-1] == "data: [DONE]", (i, status, lines[-3:])
            events = [json.loads(line[6:]) for line in lines[:-1]]
            last = events[-1]
            if "error" in last:
                assert last["error"]["code"] == "shutting_down"
                refused += 1
            else:
                assert last["choices"][0]["finish_reason"] in ("length", "stop")
                finished += 1
        else:
            body = json.loads("".join(lines))
            if status == 200:
                assert body["choices"][0]["finish_reason"] in ("length", "stop")
                finished += 1
            else:
                assert status == 503 and body["error"]["code"] == "shutting_down", (status, body)
                refused += 1
    assert finished >= 4 and refused >= 1  # the running ones finished, queued ones were refused


def test_drain_answers_waiting_at_once_and_running_after_the_grace_period():
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_model(len(tokenizer)), tokenizer, EngineConfig(max_batch=2))
    events: dict[int, list] = {i: [] for i in range(4)}
    for i in range(4):
        request = GenerationRequest([5 + i] * 3, None, max_tokens=200, ignore_eos=True)
        engine.submit(request, events[i].append)
    engine.step()  # two run, two wait
    worker = EngineThread(engine)
    worker.drain(0.0)  # no grace: the running ones are stopped too
    worker.start()
    wait_for(lambda: all(e and isinstance(e[-1], Failure) for e in events.values()))
    worker.stop()
    assert all(e[-1].code == "shutting_down" for e in events.values())
    assert all(isinstance(e, Chunk) for e in events[0][:-1])  # text first, then the failure
    assert not engine.running and sum(engine.pool.pins) == 0


def test_failing_everything_works_outside_inference_mode():
    """The engine thread used to die here: the cache was updated in place outside the step."""
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_model(len(tokenizer)), tokenizer, EngineConfig(max_batch=2))
    events = []
    for _ in range(3):
        engine.submit(GenerationRequest([5, 6, 7], None, max_tokens=50), events.append)
    engine.step()
    assert not torch.is_inference_mode_enabled()
    engine.fail_all(Failure("stopping", "shutting_down"))
    assert sum(isinstance(e, Failure) for e in events) == 3 and not engine.busy()
    assert engine.generate([GenerationRequest([5, 6, 7], None, max_tokens=3)])  # still serves

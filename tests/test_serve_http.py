"""``rankwise serve`` as a live server on 127.0.0.1: a real OpenAI client, raw HTTP for errors."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from test_serve_support import (
    Server,
    random_adapter,
    tiny_model,
    wait_for,
    write_adapters,
    write_tiny_model,
)

from rankwise.adapters.peft_format import write_adapter

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    model = write_tiny_model(root / "model")
    write_adapters(root / "adapters", model, 4)
    return root


@pytest.fixture(scope="module")
def server(root) -> Iterator[Server]:
    server = Server(
        root,
        "--api-key",
        KEY,
        "--max-batch",
        "4",
        "--max-queued",
        "4",
        "--max-prompt-tokens",
        "64",
        "--scan-interval",
        "0.2",
    )
    yield server
    assert server.stop() == 0, server.log.read_text()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def post(server: Server, path: str, body: object, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}{path}",
        content=content,
        timeout=30,
        headers={**AUTH, "Content-Type": "application/json", **(headers or {})},
    )


def test_openai_client_lists_models_and_completes(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"model", "a0", "a1", "a2", "a3"}
    assert client.models.retrieve("a1").id == "a1"
    done = client.completions.create(model="a1", prompt="Hello", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens == 5 and done.usage.completion_tokens <= 8
    streamed = client.completions.create(
        model="a1", prompt="Hello", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_chat_streamed_and_whole_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = client.chat.completions.create(
        model="a2", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="a2",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    base = client.chat.completions.create(
        model="model", messages=messages, max_tokens=10, temperature=0
    )
    assert base.choices[0].message.content != text  # the adapter changes the answer


def test_concurrent_mixed_adapters_equal_each_request_alone(client):
    jobs = [("model" if i % 5 == 4 else f"a{i % 4}", f"Prompt number {i}") for i in range(8)]

    def complete(job: tuple[str, str]) -> str:
        model, prompt = job
        done = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        return done.choices[0].text

    alone = [complete(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(complete, jobs))
    assert together == alone


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server, client):
    def error(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status, response.text
        return response.json()["error"]

    ok = {"model": "a0", "prompt": "Hi", "max_tokens": 2}
    assert error(post(server, "/v1/completions", {**ok, "model": "nope"}), 404)["code"] == (
        "model_not_found"
    )
    assert (
        "not valid JSON"
        in error(post(server, "/v1/completions", b'{"model": "a0",'), 400)["message"]
    )
    assert error(post(server, "/v1/completions", {**ok, "max_tokens": "2"}), 400)["param"] == (
        "max_tokens"
    )
    assert error(post(server, "/v1/completions", {**ok, "temperature": 9}), 400)
    assert (
        "at most 64"
        in error(post(server, "/v1/completions", {**ok, "prompt": "x" * 100}), 400)["message"]
    )
    assert (
        "max_tokens must be"
        in error(post(server, "/v1/completions", {**ok, "max_tokens": 5000}), 400)["message"]
    )
    assert error(post(server, "/v1/chat/completions", {"model": "a0", "messages": []}), 400)
    assert error(post(server, "/v1/completions", b"x" * (2 << 20)), 413)
    assert (
        error(post(server, "/v1/completions", ok, {"Authorization": "Bearer wrong"}), 401)["type"]
        == "authentication_error"
    )
    assert error(httpx.get(f"{server.url}/v1/models"), 401)
    assert error(httpx.get(f"{server.url}/nowhere", headers=AUTH), 404)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="Hi", max_tokens=2)
    assert client.completions.create(model="a0", prompt="Hi", max_tokens=2).choices


def test_too_many_concurrent_requests_get_429(server, client):
    body = {"model": "a1", "prompt": "Go", "max_tokens": 250, "temperature": 0}
    with ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(lambda _: post(server, "/v1/completions", body).status_code, range(16))
        )
    assert statuses.count(200) >= 8 and 429 in statuses  # 4 running + 4 queued fit
    assert set(statuses) == {200, 429}
    assert client.completions.create(model="a1", prompt="Go", max_tokens=2).choices


def test_admin_adds_and_removes_adapters(server, client):
    listing = httpx.get(f"{server.url}/admin/adapters", headers=AUTH).json()
    assert {a["id"] for a in listing["data"]} == {"a0", "a1", "a2", "a3"}
    traversal = post(server, "/admin/adapters", {"name": "../model"})
    assert traversal.status_code == 400 and "invalid adapter name" in traversal.text
    assert post(server, "/admin/adapters", {"name": "ghost"}).status_code == 404
    assert httpx.delete(f"{server.url}/admin/adapters/a3", headers=AUTH).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="a3", prompt="Hi", max_tokens=2)
    assert post(server, "/admin/adapters", {"name": "a3"}).status_code == 201
    assert client.completions.create(model="a3", prompt="Hi", max_tokens=2).choices


def test_dropping_a_folder_in_serves_it_and_bad_ones_are_skipped(root, server, client):
    model = tiny_model(75)
    write_adapter(random_adapter(model, 7, rank=2), root / "adapters" / "fresh")
    wrong = tiny_model(75)
    wrong.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 40, bias=False)
    write_adapter(random_adapter(wrong, 8, targets=("q_proj",)), root / "adapters" / "misfit")
    wait_for(lambda: "fresh" in {m.id for m in client.models.list()})
    assert client.completions.create(model="fresh", prompt="Hi", max_tokens=2).choices
    assert "misfit" not in {m.id for m in client.models.list()}
    shutil.rmtree(root / "adapters" / "fresh")
    shutil.rmtree(root / "adapters" / "misfit")
    wait_for(lambda: "fresh" not in {m.id for m in client.models.list()})


def test_sigterm_finishes_requests_in_flight_and_exits_cleanly(root):
    server = Server(root, "--scan-interval", "0")
    assert httpx.get(f"{server.url}/admin/adapters").status_code == 403  # no key: no admin
    body = {"model": "a0", "prompt": "Go", "max_tokens": 250, "temperature": 0, "stream": True}
    events: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(lambda: len(events) > 0 or not reader.is_alive())
    assert server.stop() == 0
    reader.join(timeout=30)
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in events[-2]

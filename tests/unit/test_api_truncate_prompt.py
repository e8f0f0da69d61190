"""vLLM's truncate_prompt_tokens: a prompt longer than k tokens keeps its last k (-1: the
context length), for completions and chat; the engine sees, usage counts and an echo shows
the truncated prompt."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from tests.helpers.fake_engine import FakeEngine

USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=64)


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(create_app(engine))


def test_completions_keep_the_prompts_last_tokens(client: TestClient, engine: FakeEngine) -> None:
    body = {"prompt": ["Hello world", "Hi"], "max_tokens": 2, "truncate_prompt_tokens": 3}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    sent = [prompt for _, prompt, _ in engine.submitted]
    assert sent == [engine.tokenizer.encode("rld", False), engine.tokenizer.encode("Hi")]
    assert response.json()["usage"]["prompt_tokens"] == 6


def test_an_echo_shows_the_truncated_prompt(client: TestClient) -> None:
    body = {"prompt": "Hello world", "max_tokens": 1, "echo": True, "truncate_prompt_tokens": 4}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert text.startswith("orld") and len(text) == 5


def test_minus_one_keeps_the_context_length(client: TestClient, engine: FakeEngine) -> None:
    body = {"prompt": "x" * 80, "max_tokens": None, "truncate_prompt_tokens": -1}
    response = client.post("/v1/completions", json=body)
    # 64 tokens fill the context: the engine, not the truncation, refuses it.
    assert len(engine.submitted[-1][1]) == 64
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_chat_keeps_the_rendered_prompts_end(client: TestClient, engine: FakeEngine) -> None:
    whole = {"messages": USER, "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=whole).status_code == 200
    rendered = engine.submitted[-1][1]
    response = client.post("/v1/chat/completions", json={**whole, "truncate_prompt_tokens": 5})
    assert response.status_code == 200, response.text
    assert engine.submitted[-1][1] == rendered[-5:] and len(rendered) > 5
    assert response.json()["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize("value", [0, -2, 65])
def test_lengths_no_context_has_are_refused_by_name(client: TestClient, value: int) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "truncate_prompt_tokens": value}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "truncate_prompt_tokens" and "64" in error["message"]

"""vLLM's return_token_ids: the prompt's token ids and each choice's generated ids, where
vLLM puts them (completions: both in each choice; chat: prompt_token_ids beside the choices,
token_ids in each; streamed: the prompt's once, each chunk's new ids with it)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from tests.helpers.fake_engine import FakeEngine, sse_payloads

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(create_app(engine))


def encode(engine: FakeEngine, text: str, special: bool = False) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=special)


def chunks(response) -> list[dict]:
    return [json.loads(p) for p in sse_payloads(response.text) if p != "[DONE]"]


def test_completions_choices_carry_prompt_and_generated_ids(
    client: TestClient, engine: FakeEngine
) -> None:
    body = {"prompt": ["Hi", "Yo"], "max_tokens": 3, "n": 2, "return_token_ids": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 4
    for choice in choices:
        prompt = body["prompt"][choice["index"] // 2]
        assert choice["prompt_token_ids"] == encode(engine, prompt, special=True)
        assert choice["token_ids"] == encode(engine, choice["text"])


def test_completions_without_the_field_stay_openais_shape(client: TestClient) -> None:
    choice = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).json()[
        "choices"
    ][0]
    assert "token_ids" not in choice and "prompt_token_ids" not in choice


def test_streamed_completions_send_the_prompt_once_and_each_chunks_ids(
    client: TestClient, engine: FakeEngine
) -> None:
    body = {"prompt": "Hi", "max_tokens": 4, "n": 2, "stream": True, "return_token_ids": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    ids: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    prompts: dict[int, list] = {}
    for chunk in chunks(response):
        for choice in chunk["choices"]:
            index = choice["index"]
            if "prompt_token_ids" in choice:
                assert index not in prompts  # once per choice
                prompts[index] = choice["prompt_token_ids"]
            ids[index] = ids.get(index, []) + choice["token_ids"]
            texts[index] = texts.get(index, "") + choice["text"]
    assert prompts == {0: encode(engine, "Hi", True), 1: encode(engine, "Hi", True)}
    assert all(ids[i] == encode(engine, texts[i]) and len(ids[i]) == 4 for i in (0, 1))


def test_chat_puts_prompt_ids_beside_the_choices(client: TestClient, engine: FakeEngine) -> None:
    body = {"messages": USER, "max_tokens": 3, "n": 2, "return_token_ids": True}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    prompt = engine.submitted[-1][1]  # the rendered conversation, tokenized
    assert result["prompt_token_ids"] == prompt and len(prompt) > 3
    for choice in result["choices"]:
        assert choice["token_ids"] == encode(engine, choice["message"]["content"])
        assert "prompt_token_ids" not in choice


def test_streamed_chat_sends_prompt_ids_first_then_each_chunks_ids(
    client: TestClient, engine: FakeEngine
) -> None:
    body = {"messages": USER, "max_tokens": 4, "stream": True, "return_token_ids": True}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    sent = chunks(response)
    prompt = engine.submitted[-1][1]
    assert sent[0]["prompt_token_ids"] == prompt and len(prompt) > 3
    assert all("prompt_token_ids" not in chunk for chunk in sent[1:])
    ids, text = [], ""
    for chunk in sent:
        for choice in chunk["choices"]:
            ids += choice.get("token_ids") or []
            text += choice["delta"].get("content", "")
    assert ids == encode(engine, text) and len(ids) == 4


def test_priority_other_than_zero_names_priority_scheduling(client: TestClient) -> None:
    """vLLM refuses it too unless started with --scheduling-policy priority."""
    response = client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "priority": 5}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "priority" and "priority scheduling" in error["message"]

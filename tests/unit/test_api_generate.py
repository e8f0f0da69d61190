"""POST /generate: vLLM's simple API."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from tests.helpers.fake_engine import DEFAULT_SCRIPT, FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as test_client:
        yield test_client


def test_generate_returns_prompt_plus_completion(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        "/generate", json={"prompt": "San Francisco is a", "max_tokens": 5, "temperature": 0}
    )
    assert response.status_code == 200
    assert response.json() == {"text": ["San Francisco is a" + DEFAULT_SCRIPT[:5]]}
    params = engine.submitted[-1][2]
    assert params.max_tokens == 5 and params.is_greedy


def test_generate_default_max_tokens_and_n(client: TestClient) -> None:
    body = client.post("/generate", json={"prompt": "x", "n": 2}).json()
    assert body["text"] == ["x" + DEFAULT_SCRIPT[:16], "x" + DEFAULT_SCRIPT[1:17]]


def test_generate_token_prompt(client: TestClient) -> None:
    body = client.post("/generate", json={"prompt": [75, 108], "max_tokens": 1}).json()
    assert body["text"] == ["Hi" + DEFAULT_SCRIPT[0]]


def test_generate_stream_is_json_lines(client: TestClient, engine: FakeEngine) -> None:
    engine.options.step_delay = 0.01  # slower than the client reads: one line per token
    response = client.post("/generate", json={"prompt": "x", "max_tokens": 3, "stream": True})
    assert response.status_code == 200
    lines = response.text.split("\n")
    assert lines[-1] == ""
    chunks = [json.loads(line) for line in lines[:-1]]
    texts = [c["text"][0] for c in chunks]
    # Cumulative text per line, ending complete; a loaded host may merge lines.
    assert texts[-1] == "xHel"
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert set(texts) <= {"xH", "xHe", "xHel"}


def test_generate_stream_error_line(client: TestClient, engine: FakeEngine) -> None:
    engine.options.fail_after = 1
    response = client.post("/generate", json={"prompt": "x", "max_tokens": 3, "stream": True})
    chunks = [json.loads(line) for line in response.text.strip().split("\n")]
    assert chunks[0] == {"text": ["xH"]}
    assert chunks[-1]["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, -1]}, "prompt"),
        ({"prompt": "x", "max_token": 5}, "max_token"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": "x", "stop_token_ids": 5}, "stop_token_ids"),
        ({"prompt": "x", "stop_token_ids": 0}, "stop_token_ids"),
        ({"prompt": "x", "stop_token_ids": True}, "stop_token_ids"),
    ],
)
def test_generate_invalid_fields_are_400(client: TestClient, body: dict, param: str) -> None:
    response = client.post("/generate", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_generate_body_must_be_an_object(client: TestClient) -> None:
    response = client.post(
        "/generate", content=b"[1, 2]", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    response = client.post(
        "/generate", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400


def test_generate_takes_allowed_token_ids(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/generate", json={"prompt": "x", "allowed_token_ids": [80, 75]})
    assert response.status_code == 200, response.text
    assert engine.submitted[-1][2].allowed_token_ids == (75, 80)
    response = client.post("/generate", json={"prompt": "x", "allowed_token_ids": [99999]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "allowed_token_ids"


def test_generate_takes_bad_words(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/generate", json={"prompt": "x", "bad_words": ["K"]})
    assert response.status_code == 200, response.text
    k = tuple(engine.tokenizer.encode("K", False))
    assert engine.submitted[-1][2].bad_words_token_ids == (k,)
    raw = {"prompt": "x", "bad_words_token_ids": [[5]]}  # only as words, as in vLLM
    assert client.post("/generate", json=raw).status_code == 400

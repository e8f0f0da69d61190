"""Bad text, oversized prompts, unexpected errors and the event loop, against the fake engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from tests.helpers.fake_engine import FakeEngine, FakeTokenizer


class _SlowTokenizer(FakeTokenizer):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        time.sleep(1.0)
        return super().encode(text, add_special_tokens)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}',
         "messages[0].content"),
        ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud800"]}', "stop"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_400(client: TestClient, path: str, raw: str, param: str) -> None:
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_huge_prompt_is_refused_by_size(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/completions", json={"prompt": "x" * 5_000_000})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert not engine.submitted


def test_unexpected_error_is_a_json_500_not_a_reraise(engine: FakeEngine) -> None:
    # Starlette's last-resort handler re-raises after answering, which makes uvicorn drop the
    # keep-alive connection; with raise_server_exceptions the re-raise would reach this test.
    def broken_stats():
        raise RuntimeError("boom")

    app = create_app(engine)

    @app.get("/broken")
    async def broken() -> None:
        broken_stats()

    with TestClient(app, raise_server_exceptions=True) as client:
        response = client.get("/broken")
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert client.get("/health").status_code == 200


def test_tokenizing_does_not_block_the_event_loop(engine: FakeEngine) -> None:
    engine.tokenizer = _SlowTokenizer()
    with TestClient(create_app(engine)) as client:
        slow = threading.Thread(
            target=client.post,
            args=("/v1/chat/completions",),
            kwargs={"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}},
        )
        slow.start()
        time.sleep(0.2)  # the chat request is inside the tokenizer by now
        start = time.monotonic()
        assert client.get("/health").status_code == 200
        took = time.monotonic() - start
        slow.join()
    assert took < 0.7, took


def test_null_fields_take_their_defaults(client: TestClient) -> None:
    nulls = dict.fromkeys(
        ["n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs",
         "stream", "stop", "seed", "logit_bias", "echo", "min_tokens", "ignore_eos"]
    )  # fmt: skip
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **nulls})
    assert response.status_code == 200, response.text
    chat_nulls = {**nulls, "logprobs": None, "top_logprobs": None, "tools": None}
    del chat_nulls["echo"]
    response = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **chat_nulls},
    )
    assert response.status_code == 200, response.text


def test_ping_and_load(client: TestClient) -> None:
    assert client.get("/ping").status_code == 200
    assert client.post("/ping").status_code == 200
    assert client.get("/load").json() == {"server_load": 1}  # this request itself


class _BlockingDecodeTokenizer(FakeTokenizer):
    """decode waits (at most 10 s) until the test lets it go, and says whether it was."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(token_ids) == 3:  # only the test's /detokenize request
            self.entered.set()
            self.released_in_time = self.release.wait(timeout=10.0)
        return super().decode(token_ids, skip_special_tokens)


def test_detokenizing_does_not_block_the_event_loop(engine: FakeEngine) -> None:
    """/detokenize decoded on the event loop: a long token list stalled every request."""
    tokenizer = _BlockingDecodeTokenizer()
    engine.tokenizer = tokenizer
    with TestClient(create_app(engine)) as client:
        slow = threading.Thread(
            target=client.post, args=("/detokenize",), kwargs={"json": {"tokens": [40, 41, 42]}}
        )
        slow.start()
        assert tokenizer.entered.wait(timeout=10.0)
        # Served while decode waits only if decode is off the loop; else after its timeout.
        assert client.get("/health").status_code == 200
        tokenizer.release.set()
        slow.join(timeout=20.0)
    assert tokenizer.released_in_time is True


def test_the_openapi_document_has_one_operation_id_per_operation(client: TestClient) -> None:
    """GET and POST /ping shared one operation id: /openapi.json warned, and generated
    clients saw one operation where there are two."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        document = client.get("/openapi.json").json()
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))

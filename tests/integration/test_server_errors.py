"""Every error a client can provoke, against real servers: status code, OpenAI's error body,
the field named in ``param``, and a server that keeps answering correctly afterwards.

The 503 case uses the fake engine behind the real app: a real server only listens once its
model is loaded and refuses new connections while it stops, so it is never observably
"up but not ready".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from molink.api import ApiConfig, create_app
from tests.helpers.fake_engine import DEFAULT_SCRIPT, FakeEngine
from tests.helpers.server_process import ThreadedServer
from tests.integration.conftest import (
    MAX_MODEL_LEN,
    MODEL,
    LiveServer,
    assert_error_body,
    assert_idle,
    live_server_process,
)

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Hello!"}]
PROMPT = "San Francisco is a"
API_KEY = "sk-molink-integration"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# (route, body fields besides the prompt, param the error must name)
INVALID_PARAMETERS: list[tuple[str, dict[str, Any], str]] = [
    (CHAT, {"temperature": -0.5}, "temperature"),
    (COMPLETIONS, {"temperature": -1}, "temperature"),
    (CHAT, {"top_p": 0}, "top_p"),
    (CHAT, {"top_p": 1.5}, "top_p"),
    (COMPLETIONS, {"top_p": -0.1}, "top_p"),
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"max_tokens": -3}, "max_tokens"),
    (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"n": 0}, "n"),
    (COMPLETIONS, {"n": 0}, "n"),
    (CHAT, {"temperature": "hot"}, "temperature"),
    (CHAT, {"max_tokens": "5"}, "max_tokens"),
    (CHAT, {"n": True}, "n"),
    (CHAT, {"stream": "yes"}, "stream"),
    (COMPLETIONS, {"stop": 5}, "stop"),
    (COMPLETIONS, {"suffix": "and so on"}, "suffix"),
    (COMPLETIONS, {"logprobs": 21}, "logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"top_k": -5}, "top_k"),
    (CHAT, {"min_p": 1.5}, "min_p"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (COMPLETIONS, {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    (CHAT, {"temperature": -1, "stream": True}, "temperature"),
]


def _body(route: str, fields: dict[str, Any]) -> dict[str, Any]:
    prompt = {"messages": MESSAGES} if route == CHAT else {"prompt": PROMPT}
    return {"model": MODEL, **prompt, **fields}


@pytest.fixture(scope="module")
def reference_answer(client: openai.OpenAI) -> str:
    """A greedy completion taken before any error, to compare with one taken after."""
    return _greedy_completion(client)


def _greedy_completion(client: openai.OpenAI) -> str:
    return (
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8)
        .choices[0]
        .text
    )


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    INVALID_PARAMETERS,
    ids=[
        f"{route.rsplit('/', 1)[-1]}-{'-'.join(fields)}" for route, fields, _ in INVALID_PARAMETERS
    ],
)
def test_invalid_parameter_is_400_naming_the_field(
    live_server: LiveServer,
    reference_answer: str,
    route: str,
    fields: dict[str, Any],
    param: str,
) -> None:
    response = live_server.http.post(route, json=_body(route, fields))
    error = assert_error_body(response, 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [{}, {"messages": "Hello!"}, {"messages": []}, {"messages": [{"content": "no role"}]}],
    ids=["missing", "string", "empty", "no-role"],
)
def test_malformed_messages_are_400(live_server: LiveServer, body: dict[str, Any]) -> None:
    response = live_server.http.post(CHAT, json={"model": MODEL, **body})
    error = assert_error_body(response, 400, check_param=False)
    assert error["param"] is not None and error["param"].startswith("messages")


def test_invalid_json_is_400(live_server: LiveServer) -> None:
    response = live_server.http.post(
        CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert_error_body(response, 400)


def test_sdk_reports_the_field_of_a_bad_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-2)
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"
    assert caught.value.type == "invalid_request_error"


# -- context length ---------------------------------------------------------------------------


def _long_text(live_server: LiveServer, min_tokens: int) -> str:
    text = "hello " * min_tokens
    assert live_server.count_prompt_tokens(text) >= min_tokens
    return text


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_prompt_beyond_the_context_is_400_with_the_limit(
    live_server: LiveServer, stream: bool
) -> None:
    text = _long_text(live_server, MAX_MODEL_LEN + 8)
    for route, prompt in (
        (CHAT, {"messages": [{"role": "user", "content": text}]}),
        (COMPLETIONS, {"prompt": text, "max_tokens": 1}),
    ):
        response = live_server.http.post(route, json={"model": MODEL, "stream": stream, **prompt})
        error = assert_error_body(response, 400, "prompt")
        assert error["code"] == "context_length_exceeded"
        assert str(MAX_MODEL_LEN) in error["message"]


def test_prompt_plus_max_tokens_beyond_the_context_is_400(live_server: LiveServer) -> None:
    prompt_tokens = live_server.count_prompt_tokens(PROMPT)
    max_tokens = MAX_MODEL_LEN - prompt_tokens + 1
    for route in (CHAT, COMPLETIONS):
        response = live_server.http.post(route, json=_body(route, {"max_tokens": max_tokens}))
        error = assert_error_body(response, 400, "max_tokens")
        assert error["code"] == "context_length_exceeded"
        assert str(MAX_MODEL_LEN) in error["message"]
    # A default max_tokens (16 for completions) counts as well.
    text = _long_text(live_server, MAX_MODEL_LEN - 8)
    response = live_server.http.post(COMPLETIONS, json={"model": MODEL, "prompt": text})
    assert_error_body(response, 400, "max_tokens")


def test_sdk_context_length_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_MODEL_LEN)
    assert caught.value.code == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in caught.value.message


# -- unknown model and route --------------------------------------------------------------------


def test_unknown_model_is_404(live_server: LiveServer, client: openai.OpenAI) -> None:
    for route in (CHAT, COMPLETIONS):
        response = live_server.http.post(route, json=_body(route, {"model": "gpt-4o"}))
        error = assert_error_body(response, 404, "model")
        assert error["code"] == "model_not_found"
        assert "gpt-4o" in error["message"]
    assert_error_body(live_server.http.get("/v1/models/gpt-4o"), 404, "model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


def test_unknown_route_is_404(live_server: LiveServer) -> None:
    assert_error_body(live_server.http.get("/v1/engines"), 404)


def test_server_still_serves_correctly_after_errors(
    live_server: LiveServer, client: openai.OpenAI, reference_answer: str
) -> None:
    # Runs after the error tests of this module (file order): nothing leaked, same answer.
    assert _greedy_completion(client) == reference_answer
    assert_idle(live_server)


# -- authentication ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    with live_server_process(api_key=API_KEY) as server:
        yield server


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}],
    ids=["missing", "wrong", "no-scheme"],
)
def test_bad_or_missing_key_is_401(keyed_server: LiveServer, headers: dict[str, str]) -> None:
    for method, path, body in (
        ("POST", CHAT, _body(CHAT, {"max_tokens": 2})),
        ("POST", COMPLETIONS, _body(COMPLETIONS, {"max_tokens": 2})),
        ("GET", "/v1/models", None),
    ):
        response = httpx.request(
            method, f"{keyed_server.base_url}{path}", json=body, headers=headers, timeout=30
        )
        error = assert_error_body(response, 401)
        assert error["code"] == "invalid_api_key"


def test_sdk_with_a_wrong_key_gets_401_and_the_right_key_works(keyed_server: LiveServer) -> None:
    wrong = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401
    right = keyed_server.sync_client()
    assert [m.id for m in right.models.list().data] == [MODEL]
    response = right.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert response.usage is not None and response.usage.completion_tokens == 2
    # Health stays open for load balancers; metrics show the swarm, so they need the key.
    assert httpx.get(f"{keyed_server.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{keyed_server.base_url}/metrics", timeout=10).status_code == 401
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert (
        httpx.get(f"{keyed_server.base_url}/metrics", headers=headers, timeout=10).status_code
        == 200
    )


# -- not ready (fake engine, see the module docstring) ------------------------------------------


def test_not_ready_is_503_then_serves() -> None:
    engine = FakeEngine()
    engine.not_ready_reason = "stage 2 has not joined yet"
    with ThreadedServer(create_app(engine, ApiConfig())) as server:
        base = server.base_url
        assert_error_body(httpx.get(f"{base}/health", timeout=10), 503)
        for route in (CHAT, COMPLETIONS):
            body = _body(route, {"model": "fake-model"})
            error = assert_error_body(httpx.post(f"{base}{route}", json=body, timeout=10), 503)
            assert error["type"] == "service_unavailable_error"
            assert "stage 2 has not joined yet" in error["message"]
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=10)
        with pytest.raises(openai.InternalServerError) as caught:
            sdk.completions.create(model="fake-model", prompt=PROMPT, max_tokens=3)
        assert caught.value.status_code == 503
        engine.not_ready_reason = None
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        text = sdk.completions.create(model="fake-model", prompt=PROMPT, max_tokens=5)
        assert text.choices[0].text == DEFAULT_SCRIPT[:5]

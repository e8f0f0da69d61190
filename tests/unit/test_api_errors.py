"""Every error answer: status code, OpenAI error body, and the server still serving after."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.errors import ModelNotReadyError, OutOfCapacityError
from tests.helpers.fake_engine import FakeEngine, sse_payloads

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
COMPLETION = {"prompt": "Hi", "max_tokens": 3}
API_KEY = "sk-test-key"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=64)


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as test_client:
        yield test_client


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    assert error["code"] == code
    return error


def assert_still_serving(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"n": True}, "n"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"stop": 5}, "stop"),
        ({"temperature": -0.5}, "temperature"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        (
            {"stream_options": {"include_usage": "yes"}, "stream": True},
            "stream_options.include_usage",
        ),
    ],
)
def test_wrong_type_or_range_is_400_naming_the_field(
    client: TestClient, body: dict, param: str
) -> None:
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, **body}), 400, param)
    assert error["type"] == "invalid_request_error"
    assert_still_serving(client)


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 400)
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("content", "content_type", "says"),
    [
        (b"", "application/json", "JSON object"),
        (b"[]", "application/json", "JSON object"),
        # curl -d without -H sends a form content type: the JSON in it was never read.
        (b'{"prompt": "Hi"}', "application/x-www-form-urlencoded", "application/json"),
        (b'{"prompt": "Hi"}', "text/plain", "application/json"),
        (b'{"prompt": "Hi",}', "application/json", "double quotes"),
    ],
)
def test_a_body_that_is_no_json_object_says_what_is_wrong(
    client: TestClient, content: bytes, content_type: str, says: str
) -> None:
    """These said "Field required" or "Input should be a valid dictionary...", naming no
    field; a JSON syntax error did not say where."""
    response = client.post(
        "/v1/completions", content=content, headers={"content-type": content_type}
    )
    error = assert_error(response, 400)
    assert says in error["message"], error["message"]


def test_missing_required_field_is_400(client: TestClient) -> None:
    assert_error(client.post("/v1/completions", json={"max_tokens": 2}), 400, "prompt")
    assert_error(client.post("/v1/chat/completions", json={}), 400, "messages")


def test_prompt_beyond_the_context_is_400(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "x" * 100})
    error = assert_error(response, 400, "prompt", "context_length_exceeded")
    assert "64" in error["message"]
    assert_still_serving(client)


def test_prompt_plus_max_tokens_beyond_the_context_is_400(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 62})
    error = assert_error(response, 400, "max_tokens", "context_length_exceeded")
    assert "64" in error["message"]
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 60, "stream": True})
    assert_error(response, 400, "max_tokens", "context_length_exceeded")
    assert_still_serving(client)


def test_unknown_model_is_404(client: TestClient) -> None:
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        response = client.post(path, json={**body, "model": "gpt-4"})
        error = assert_error(response, 404, "model", "model_not_found")
        assert "gpt-4" in error["message"]
    assert_error(
        client.post("/tokenize", json={"prompt": "a", "model": "x"}),
        404,
        "model",
        "model_not_found",
    )
    assert_still_serving(client)


def test_unknown_route_is_404_with_error_body(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_not_ready_is_503_with_the_reason(client: TestClient, engine: FakeEngine) -> None:
    engine.not_ready_reason = "no stage serves layers [10, 30)"
    for path, body in (
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", COMPLETION),
        ("/generate", {"prompt": "Hi"}),
    ):
        error = assert_error(client.post(path, json=body), 503)
        assert "layers [10, 30)" in error["message"]
        assert error["type"] == "service_unavailable_error"
    engine.not_ready_reason = None
    assert_still_serving(client)


def test_engine_refusals_before_the_first_output(engine: FakeEngine, client: TestClient) -> None:
    engine.options.submit_error = ModelNotReadyError("stage 2 is still loading")
    error = assert_error(client.post("/v1/chat/completions", json=CHAT), 503)
    assert "stage 2 is still loading" in error["message"]
    engine.options.submit_error = OutOfCapacityError("needs 90 blocks, the smallest stage has 40")
    assert_error(client.post("/v1/completions", json=COMPLETION), 400)
    engine.options.submit_error = None
    assert_still_serving(client)


def test_failure_mid_request_is_500(engine: FakeEngine, client: TestClient) -> None:
    engine.options.fail_after = 1
    error = assert_error(client.post("/v1/chat/completions", json=CHAT), 500)
    assert "stage 1 stopped answering" in error["message"]
    assert error["type"] == "server_error"
    engine.options.fail_after = None
    assert_still_serving(client)


def test_error_output_mid_request_is_500(engine: FakeEngine, client: TestClient) -> None:
    engine.options.error_after = 1
    error = assert_error(client.post("/v1/completions", json=COMPLETION), 500)
    assert "stage 1 died" in error["message"]
    engine.options.error_after = None
    assert_still_serving(client)


@pytest.mark.parametrize("switch", ["fail_after", "error_after"])
def test_failure_mid_stream_ends_with_error_event(
    engine: FakeEngine, client: TestClient, switch: str
) -> None:
    setattr(engine.options, switch, 1)
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "server_error"
    assert "stage 1" in error["message"]
    assert json.loads(payloads[0])["choices"][0]["delta"]["role"] == "assistant"
    setattr(engine.options, switch, None)
    assert_still_serving(client)


def test_one_refused_prompt_aborts_the_others(engine: FakeEngine, client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": ["a", "x" * 100], "max_tokens": 2})
    assert_error(response, 400, "prompt", "context_length_exceeded")
    first_request_id = engine.submitted[0][0]
    assert first_request_id in engine.abort_calls
    assert not engine.active
    assert_still_serving(client)


def test_failure_mid_request_releases_the_engine_request(
    engine: FakeEngine, client: TestClient
) -> None:
    engine.options.fail_after = 1
    client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 5})
    assert not engine.active


@pytest.fixture
def keyed_client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ApiConfig(api_key=API_KEY))) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": "Basic x"},
    ],
)
def test_api_key_required(keyed_client: TestClient, headers: dict) -> None:
    for method, path, body in (
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", COMPLETION),
        ("GET", "/v1/models", None),
        ("POST", "/generate", {"prompt": "a"}),
        ("POST", "/tokenize", {"prompt": "a"}),
    ):
        response = keyed_client.request(method, path, json=body, headers=headers)
        error = assert_error(response, 401, None, "invalid_api_key")
        assert error["type"] == "authentication_error"


def test_api_key_accepted_health_open_metrics_keyed(keyed_client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert keyed_client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    assert (
        keyed_client.get("/v1/models", headers={"authorization": f"bearer {API_KEY}"}).status_code
        == 200
    )
    assert keyed_client.get("/health").status_code == 200
    # vLLM's (and SageMaker's) liveness probe answers as /health does: it was keyed, so a
    # probe of /ping failed on a server started with --api-key.
    assert keyed_client.get("/ping").status_code == 200
    assert keyed_client.post("/ping").status_code == 200
    assert keyed_client.get("/metrics").status_code == 401
    assert keyed_client.get("/metrics", headers=headers).status_code == 200

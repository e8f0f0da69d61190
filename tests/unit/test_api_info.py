"""Routes that generate nothing: models, health, version, metrics, tokenize, detokenize."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from tests.helpers.fake_engine import BOS_ID, FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as test_client:
        yield test_client


def test_models_lists_the_served_model(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "fake-model"
    assert card["object"] == "model"
    assert card["owned_by"] == "molink"
    assert card["max_model_len"] == 256
    assert isinstance(card["created"], int)


def test_models_lists_every_alias(engine: FakeEngine) -> None:
    app = create_app(engine, ApiConfig(served_model_names=("alias", "fake-model")))
    with TestClient(app) as test_client:
        ids = [card["id"] for card in test_client.get("/v1/models").json()["data"]]
        assert ids == ["alias", "fake-model"]
        assert test_client.get("/v1/models/alias").json()["id"] == "alias"


def test_retrieve_unknown_model_is_404(client: TestClient) -> None:
    response = client.get("/v1/models/nope")
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


def test_health_follows_readiness(client: TestClient, engine: FakeEngine) -> None:
    assert client.get("/health").status_code == 200
    engine.not_ready_reason = "layers [12, 24) are not served by any stage"
    response = client.get("/health")
    assert response.status_code == 503
    assert "layers [12, 24)" in response.json()["error"]["message"]
    engine.not_ready_reason = None
    assert client.get("/health").status_code == 200


def test_version(client: TestClient) -> None:
    assert client.get("/version").json()["version"]


def test_metrics_after_a_request(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "n": 2})
    assert response.status_code == 200
    text = client.get("/metrics").text
    labels = 'model_name="fake-model"'
    assert f"molink:num_free_kv_blocks{{{labels}}} 64.0" in text
    assert f"molink:num_total_kv_blocks{{{labels}}} 64.0" in text
    assert f"molink:num_requests_running{{{labels}}} 0.0" in text
    assert f"molink:num_requests_waiting{{{labels}}} 0.0" in text
    assert f"molink:kv_cache_usage_perc{{{labels}}}" in text
    assert f"molink:prompt_tokens_total{{{labels}}} 3.0" in text  # BOS + "Hi"
    assert f"molink:generation_tokens_total{{{labels}}} 8.0" in text
    assert f'molink:request_success_total{{finished_reason="length",{labels}}} 2.0' in text
    assert f"molink:time_to_first_token_seconds_count{{{labels}}} 1" in text
    assert f"molink:e2e_request_latency_seconds_count{{{labels}}} 1" in text
    assert f"molink:time_per_output_token_seconds_count{{{labels}}} 1" in text
    assert "# TYPE molink:time_to_first_token_seconds histogram" in text


def test_metrics_content_type_is_prometheus(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_metric_sources_add_lines(engine: FakeEngine) -> None:
    def link_lines() -> list[str]:
        return ['molink:link_bandwidth_bytes_per_second{link="0->1"} 12500000.0']

    def broken() -> list[str]:
        raise RuntimeError("boom")

    app = create_app(engine, ApiConfig(metric_sources=(link_lines, broken)))
    with TestClient(app) as test_client:
        text = test_client.get("/metrics").text
    assert 'molink:link_bandwidth_bytes_per_second{link="0->1"} 12500000.0' in text
    app.state.molink.metrics.add_source(lambda: ["molink:late_metric 1.0"])
    with TestClient(app) as test_client:
        assert "molink:late_metric 1.0" in test_client.get("/metrics").text


def test_tokenize_prompt(client: TestClient) -> None:
    body = client.post("/tokenize", json={"prompt": "Hi"}).json()
    assert body == {
        "count": 3,
        "max_model_len": 256,
        "tokens": [BOS_ID, 75, 108],
        "token_strs": None,
    }
    body = client.post("/tokenize", json={"prompt": "Hi", "add_special_tokens": False}).json()
    assert body["tokens"] == [75, 108]


def test_tokenize_token_strs(client: TestClient) -> None:
    body = client.post("/tokenize", json={"prompt": "Hi", "return_token_strs": True}).json()
    assert body["token_strs"] == ["<s>", "H", "i"]


def test_tokenize_messages_uses_the_chat_template(client: TestClient) -> None:
    body = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    expected = FakeEngine().tokenizer.encode("[user]Hi\n[assistant]", add_special_tokens=False)
    assert body["tokens"] == expected
    assert body["count"] == len(expected)


def test_tokenize_messages_takes_the_chat_rendering_options(client: TestClient) -> None:
    """The same rendering options as chat completions (vLLM's tokenize takes them too)."""
    tokenizer = FakeEngine().tokenizer
    user = {"role": "user", "content": "Hi"}
    body = {"messages": [user], "add_generation_prompt": False}
    expected = tokenizer.encode("[user]Hi\n", add_special_tokens=False)
    assert client.post("/tokenize", json=body).json()["tokens"] == expected
    opened = [user, {"role": "assistant", "content": "Yo"}]
    body = {"messages": opened, "continue_final_message": True}
    expected = tokenizer.encode("[user]Hi\n[assistant]Yo", add_special_tokens=False)
    assert client.post("/tokenize", json=body).json()["tokens"] == expected
    refused = client.post("/tokenize", json={"messages": [user], "chat_template": "{{ 1 }}"})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "chat_template"


def test_tokenize_needs_prompt_or_messages(client: TestClient) -> None:
    response = client.post("/tokenize", json={})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_detokenize(client: TestClient) -> None:
    assert client.post("/detokenize", json={"tokens": [75, 108]}).json() == {"prompt": "Hi"}


def test_detokenize_rejects_ids_outside_the_vocabulary(client: TestClient) -> None:
    response = client.post("/detokenize", json={"tokens": [75, 100000]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tokens"


class _OneChoiceFails(FakeEngine):
    """Choice 0 ends with an error at the second step while choice 1 would go on (until
    the request is aborted), as when one sequence of a request fails on the head."""

    def _maybe_fail(self, step: int, choices: list) -> None:
        if step > 1 and choices[0].finish_reason is None:
            choices[0].finish_reason, choices[0].error = "error", "sequence 0 failed"

    async def _generate(self, request_id, prompt, params):
        async for output in super()._generate(request_id, prompt, params):
            yield output
            if not output.finished and output.outputs[0].finish_reason == "error":
                await asyncio.Event().wait()


def test_metrics_count_each_sequence_of_a_failed_request_once() -> None:
    engine = _OneChoiceFails()
    with TestClient(create_app(engine)) as test_client:
        body = {"prompt": "Hi", "max_tokens": 50, "n": 2}
        assert test_client.post("/v1/completions", json=body).status_code == 500
        text = test_client.get("/metrics").text
    assert engine.abort_calls and not engine.active
    labels = 'model_name="fake-model"'
    assert f'molink:request_success_total{{finished_reason="error",{labels}}} 1.0' in text
    assert f'molink:request_success_total{{finished_reason="abort",{labels}}} 1.0' in text

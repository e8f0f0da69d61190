"""stream_options as vLLM reads it: include_usage defaults to true once stream_options is
sent, so {} or {"continuous_usage_stats": true} alone still end the stream with usage."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from tests.helpers.fake_engine import FakeEngine, sse_payloads

USER = [{"role": "user", "content": "Hi"}]
REQUESTS = [
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": USER}),
]


def streamed(path: str, body: dict, options: dict | None) -> list[dict]:
    with TestClient(create_app(FakeEngine())) as client:
        request = {**body, "max_tokens": 3, "stream": True}
        if options is not None:
            request["stream_options"] = options
        response = client.post(path, json=request)
        assert response.status_code == 200, response.text
        return [json.loads(p) for p in sse_payloads(response.text) if p != "[DONE]"]


@pytest.mark.parametrize(("path", "body"), REQUESTS)
def test_empty_stream_options_end_with_usage(path: str, body: dict) -> None:
    chunks = streamed(path, body, {})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all("usage" not in chunk for chunk in chunks[:-1])


@pytest.mark.parametrize(("path", "body"), REQUESTS)
def test_continuous_usage_alone_puts_usage_in_every_chunk(path: str, body: dict) -> None:
    chunks = streamed(path, body, {"continuous_usage_stats": True})
    assert all("usage" in chunk for chunk in chunks)


@pytest.mark.parametrize(("path", "body"), REQUESTS)
@pytest.mark.parametrize("options", [None, {"include_usage": False}])
def test_usage_left_out_when_not_asked(path: str, body: dict, options: dict | None) -> None:
    assert all("usage" not in chunk for chunk in streamed(path, body, options))

"""One of n choices ending with an error: as vLLM, the whole answer is that error (a 500,
or an error event in a stream), the message says which choice failed and why, the
siblings' engine request is aborted, and other requests are untouched."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from molink.api import create_app
from tests.helpers.fake_engine import FakeEngine, FakeEngineOptions, sse_payloads

USER = [{"role": "user", "content": "Hi"}]


def sibling_fails_engine() -> FakeEngine:
    # Choice 1 errs at its third step; choice 0 would go on to max_tokens.
    return FakeEngine(options=FakeEngineOptions(error_after=2, error_choices=(1,)))


async def post(app, path: str, body: dict) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, json=body, timeout=10)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 8, "n": 2}),
        ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "n": 2}),
    ],
)
def test_a_failed_choice_fails_the_answer_naming_it(path: str, body: dict) -> None:
    engine = sibling_fails_engine()
    app = create_app(engine)
    response = asyncio.run(post(app, path, body))
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "choice 1" in error["message"] and "stage 1 died" in error["message"]
    (request_id, _, _) = engine.submitted[-1]
    assert engine.abort_calls == [request_id]  # the sibling still running is stopped


def test_a_streamed_failed_choice_ends_in_an_error_event_naming_it() -> None:
    app = create_app(sibling_fails_engine())
    body = {"prompt": "Hi", "max_tokens": 8, "n": 2, "stream": True}
    response = asyncio.run(post(app, "/v1/completions", body))
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert "choice 1" in error["message"] and "stage 1 died" in error["message"]
    assert all("choices" in json.loads(p) for p in payloads[:-2])

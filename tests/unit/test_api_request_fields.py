"""Request fields vLLM and OpenAI clients send that were accepted and ignored: each is now
honoured or refused naming it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from molink.api.chat_render import render_chat_text
from molink.api.context import ChatOptions
from molink.api.schemas import ChatCompletionRequest
from molink.tokenizer.tokenizer import Tokenizer
from tests.helpers.fake_engine import FakeEngine

USER = [{"role": "user", "content": "Hi"}]
TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(FakeEngine()))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"best_of": 2}, "best_of"),
        ({"priority": 1}, "priority"),
    ],
)
def test_chat_fields_that_would_be_ignored_are_400(
    client: TestClient, body: dict, field: str
) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    neutral = {"best_of": 1, "priority": 0}[field]
    ok = client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, field: neutral}
    )
    assert ok.status_code == 200, ok.text


def render(tokenizer: Tokenizer, **body: object) -> str:
    ctx = SimpleNamespace(
        engine=SimpleNamespace(tokenizer=tokenizer),
        chat=ChatOptions(chat_template=(TEMPLATES / "gpt-oss.jinja").read_text()),
    )
    request = ChatCompletionRequest(messages=USER, **body)
    return render_chat_text(ctx, request.messages, request)


def test_reasoning_effort_reaches_the_chat_template(tiny_model_dir) -> None:
    """OpenAI's field for reasoning models; gpt-oss's template reads it."""
    tokenizer = Tokenizer.from_dir(tiny_model_dir("llama"))
    assert "Reasoning: medium" in render(tokenizer)
    assert "Reasoning: high" in render(tokenizer, reasoning_effort="high")
    kwargs = {"chat_template_kwargs": {"reasoning_effort": "low"}, "reasoning_effort": "high"}
    assert "Reasoning: low" in render(tokenizer, **kwargs)  # the kwargs win, as in vLLM


def test_a_reasoning_effort_that_is_not_one_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 2, "reasoning_effort": "extreme"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "reasoning_effort"

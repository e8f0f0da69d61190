"""continue_final_message with add_generation_prompt true asks for two different prompts:
a 400 naming the field, as vLLM (for chat completions and /tokenize alike); either alone,
or set through chat_template_kwargs, still works."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from tests.helpers.fake_engine import FakeEngine

PREFILL = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "He"}]
BOTH = {"continue_final_message": True, "add_generation_prompt": True}


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(FakeEngine()))


@pytest.mark.parametrize(
    "flags",
    [
        BOTH,
        {"continue_final_message": True, "chat_template_kwargs": {"add_generation_prompt": True}},
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_both_at_once_are_refused_by_name(client: TestClient, path: str, flags: dict) -> None:
    response = client.post(path, json={"messages": PREFILL, "max_tokens": 2, **flags})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (
        error["param"] == "continue_final_message" and "add_generation_prompt" in error["message"]
    )


@pytest.mark.parametrize(
    "flags",
    [
        {"continue_final_message": True},
        {"continue_final_message": True, "add_generation_prompt": False},
        {"add_generation_prompt": True},
    ],
)
def test_either_alone_is_served(client: TestClient, flags: dict) -> None:
    response = client.post(
        "/v1/chat/completions", json={"messages": PREFILL, "max_tokens": 2, **flags}
    )
    assert response.status_code == 200, response.text

"""Tool calls in chat replies, against the fake engine (which writes a fixed script): what a
streamed and a non-streamed reply carry, with and without parallel_tool_calls."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.api.context import ChatOptions
from tests.helpers.fake_engine import FakeEngine, FakeEngineOptions, sse_payloads

USER = [{"role": "user", "content": "Hi"}]
TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object"}},
}
CALL_1 = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
CALL_2 = '<tool_call>\n{"name": "f", "arguments": {"a": 2}}\n</tool_call>'


def client_for(script: str) -> TestClient:
    """The fake engine writes ``script`` once, then ends the reply with EOS (finish "stop")."""
    engine = FakeEngine(script=script, options=FakeEngineOptions(eos_after=len(script)))
    chat = ChatOptions(enable_auto_tool_choice=True, tool_call_parser="hermes")
    return TestClient(create_app(engine, ApiConfig(chat=chat)))


def complete(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": USER, **body})
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    message = choice["message"]
    return {
        "content": message["content"],
        "calls": [c["function"] for c in message.get("tool_calls", [])],
        "finish_reason": choice["finish_reason"],
    }


def stream(client: TestClient, **body: object) -> dict:
    """The streamed reply put back together as a client library does."""
    response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True, **body})
    assert response.status_code == 200, response.text
    content: str | None = None
    calls: dict[int, dict] = {}
    finish = None
    for payload in sse_payloads(response.text)[:-1]:
        (choice,) = json.loads(payload)["choices"]
        delta = choice["delta"]
        if delta.get("content"):
            content = (content or "") + delta["content"]
        for call in delta.get("tool_calls", []):
            function = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            function["name"] += call.get("function", {}).get("name") or ""
            function["arguments"] += call.get("function", {}).get("arguments") or ""
        finish = choice["finish_reason"] or finish
    return {
        "content": content,
        "calls": [calls[i] for i in sorted(calls)],
        "finish_reason": finish,
    }


@pytest.mark.parametrize("reply", [complete, stream])
def test_parallel_tool_calls_false_keeps_only_the_first_call_with_auto(reply) -> None:
    """As the OpenAI API (and vLLM, which keeps the first): at most one call. Only
    tool_choice "required" honoured it; "auto" returned both calls."""
    with client_for("Sure." + CALL_1 + CALL_2) as client:
        both = reply(client, tools=[TOOL])
        one = reply(client, tools=[TOOL], parallel_tool_calls=False)
    assert [json.loads(c["arguments"]) for c in both["calls"]] == [{"a": 1}, {"a": 2}]
    assert one["calls"] == [{"name": "f", "arguments": '{"a": 1}'}]
    assert one["finish_reason"] == "tool_calls" and one["content"] == "Sure."


@pytest.mark.parametrize("reply", [complete, stream])
def test_parallel_tool_calls_false_with_a_named_function_is_one_call(reply) -> None:
    named = {"type": "function", "function": {"name": "f"}}
    with client_for('{"a": 1}') as client:
        body = reply(client, tools=[TOOL], tool_choice=named, parallel_tool_calls=False)
    assert body["calls"] == [{"name": "f", "arguments": '{"a": 1}'}]


@pytest.mark.parametrize(
    "script",
    [
        "Let me look.\n\n" + CALL_1,
        "  Two calls:\n" + CALL_1 + "\n" + CALL_2 + "\n",
        "\n" + CALL_1,
        CALL_1 + " trailing words",
        "No call at all.\n",
        "Almost <tool_ a call\n",
        "<tool_call>{not json}</tool_call>",
    ],
)
def test_hermes_streamed_reply_equals_the_non_streamed_one(script: str) -> None:
    """The non-streamed content was stripped of whitespace, the streamed one was not. vLLM's
    hermes parser strips neither: the content is the text before the first call as written."""
    with client_for(script) as client:
        whole = complete(client, tools=[TOOL])
        streamed = stream(client, tools=[TOOL])
    assert streamed == whole
    if whole["calls"]:
        assert whole["content"] == (script[: script.find("<tool_call>")] or None)


@pytest.mark.parametrize("max_tokens", [None, 10])
@pytest.mark.parametrize(
    "script", ['[{"name": "f", "parameters": {"a": 1}}]', '[{"name": "f", "param']
)
def test_required_streamed_reply_equals_the_non_streamed_one(script: str, max_tokens) -> None:
    """A reply that holds no complete call (cut by max_tokens) was the content of a stream
    but null without one; it is the content of both now, so a client sees what was written."""
    body: dict = {"tools": [TOOL], "tool_choice": "required"}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    with client_for(script) as client:
        whole = complete(client, **body)
        streamed = stream(client, **body)
    assert streamed == whole
    if not whole["calls"]:
        assert whole["content"] == script[:max_tokens]


@pytest.mark.parametrize(
    ("script", "tool_choice"),
    [('{"a": 1}', {"type": "function", "function": {"name": "f"}}), (CALL_1, "auto")],
)
def test_echo_opens_a_reply_with_tool_calls_too(script: str, tool_choice) -> None:
    """As vLLM does, and as a stream did already: echo's final assistant message opens the
    content; a non-streamed reply with tool calls dropped it."""
    messages = [*USER, {"role": "assistant", "content": "Sure:"}]
    body = {"messages": messages, "tools": [TOOL], "tool_choice": tool_choice, "echo": True}
    with client_for(script) as client:
        whole = complete(client, **body)
        streamed = stream(client, **body)
    assert streamed == whole
    assert whole["content"] == "Sure:" and len(whole["calls"]) == 1

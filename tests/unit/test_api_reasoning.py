"""--reasoning-parser: a reply's <think> part is reasoning_content, whole and streamed."""

from __future__ import annotations

import argparse
import json

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.api.context import ChatOptions
from molink.api.reasoning import ReasoningSplit, ReasoningStream, split_reasoning
from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.serve import chat_options
from tests.helpers.fake_engine import FakeEngine, FakeEngineOptions, sse_payloads

USER = [{"role": "user", "content": "Hi"}]
REPLY = "<think>why not</think>answer"


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        ("deepseek_r1", REPLY, ReasoningSplit("why not", "answer")),
        ("deepseek_r1", "why</think>answer", ReasoningSplit("why", "answer")),
        ("deepseek_r1", "<think>cut short", ReasoningSplit("cut short", None)),
        ("deepseek_r1", "why</think>", ReasoningSplit("why", None)),
        ("qwen3", REPLY, ReasoningSplit("why not", "answer")),
        ("qwen3", "why</think>answer", ReasoningSplit("why", "answer")),
        ("qwen3", "plain answer", ReasoningSplit(None, "plain answer")),
    ],
)
def test_split_reasoning(parser: str, text: str, expected: ReasoningSplit) -> None:
    assert split_reasoning(parser, text) == expected


@pytest.mark.parametrize("text", [REPLY, "why</think>answer", "<think>cut </thi", "<thin"])
def test_a_stream_sends_what_the_whole_reply_holds_at_every_cut(text: str) -> None:
    whole = split_reasoning("deepseek_r1", text)
    for size in (1, 2, 3, 5, len(text)):
        stream, reasoning, content = ReasoningStream(), "", ""
        for start in range(0, len(text), size):
            r, c = stream.feed(text[start : start + size])
            reasoning, content = reasoning + r, content + c
            assert "<" not in r or "<" in whole.reasoning  # a tag is never sent in pieces
        r, c = stream.finish()
        assert (reasoning + r or None, content + c or None) == (whole.reasoning, whole.content)


def client_with(parser: str | None) -> TestClient:
    engine = FakeEngine(script=REPLY)
    options = ChatOptions(reasoning_parser=parser)
    return TestClient(create_app(engine, ApiConfig(chat=options)))


def chat(client: TestClient, **body: object) -> dict:
    payload = {"messages": USER, "max_tokens": len(REPLY), **body}
    response = client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]


def test_the_reply_is_split() -> None:
    with client_with("deepseek_r1") as client:
        message = chat(client)
        assert (message["reasoning_content"], message["content"]) == ("why not", "answer")
        hidden = chat(client, include_reasoning=False)
        assert "reasoning_content" not in hidden and hidden["content"] == "answer"
        # A constrained reply is the constraint's, not a thought.
        constrained = chat(client, structured_outputs={"regex": ".*"})
        assert constrained["content"] == REPLY and "reasoning_content" not in constrained
    with client_with(None) as client:
        message = chat(client)
        assert message["content"] == REPLY and "reasoning_content" not in message


def test_qwen3_without_thinking_is_content() -> None:
    with client_with("qwen3") as client:
        message = chat(client, chat_template_kwargs={"enable_thinking": False})
        assert message["content"] == REPLY and "reasoning_content" not in message
        assert chat(client)["reasoning_content"] == "why not"


def test_the_stream_is_split() -> None:
    with client_with("deepseek_r1") as client:
        response = client.post(
            "/v1/chat/completions",
            json={"messages": USER, "max_tokens": len(REPLY), "stream": True},
        )
    chunks = [json.loads(p) for p in sse_payloads(response.text) if p != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") or "" for d in deltas)
    assert (reasoning, content) == ("why not", "answer")


def test_the_flag_reaches_the_chat_options() -> None:
    parser = add_engine_args(argparse.ArgumentParser())
    args = EngineArgs.from_namespace(parser.parse_args(["--reasoning-parser", "qwen3"]))
    assert chat_options(args, None, {}).reasoning_parser == "qwen3"
    with pytest.raises(SystemExit):
        parser.parse_args(["--reasoning-parser", "no_such_parser"])


def test_the_cli_lists_the_parsers_the_api_has() -> None:
    from molink.api.reasoning import REASONING_PARSERS
    from molink.cli.vllm_api_args import REASONING_PARSERS as FLAG_CHOICES

    assert FLAG_CHOICES == REASONING_PARSERS


def test_a_tool_call_after_the_thoughts_is_read() -> None:
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    script = f"<think>use f</think>{call}"
    engine = FakeEngine(script=script, options=FakeEngineOptions(eos_after=len(script)))
    options = ChatOptions(
        reasoning_parser="qwen3", enable_auto_tool_choice=True, tool_call_parser="hermes"
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"messages": USER, "max_tokens": len(script) + 1, "tools": [tool]}
    with TestClient(create_app(engine, ApiConfig(chat=options))) as client:
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert whole["message"]["reasoning_content"] == "use f"
    assert whole["message"]["tool_calls"][0]["function"]["name"] == "f"
    chunks = [json.loads(p) for p in sse_payloads(streamed.text) if p != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "use f"
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["f"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

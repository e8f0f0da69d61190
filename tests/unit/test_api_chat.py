"""POST /v1/chat/completions against the fake engine: template, shapes, streaming, logprobs."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from molink.step import PromptTokenLogprob, TokenLogprob
from tests.helpers.fake_engine import DEFAULT_SCRIPT, EOS_ID, FakeEngine, sse_payloads

USER_HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as test_client:
        yield test_client


def chat(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": USER_HI, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream_chunks(client: TestClient, **body: object) -> list[dict]:
    response = client.post(
        "/v1/chat/completions", json={"messages": USER_HI, "stream": True, **body}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_shape_and_usage(client: TestClient, engine: FakeEngine) -> None:
    body = chat(client, model="fake-model", max_tokens=5, temperature=0.7)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": DEFAULT_SCRIPT[:5]}
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    prompt_ids = engine.tokenizer.encode("[user]Hi\n[assistant]", add_special_tokens=False)
    assert engine.submitted[-1][1] == prompt_ids
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 5,
        "total_tokens": len(prompt_ids) + 5,
    }


def test_roles_and_text_parts(client: TestClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "more"},
    ]
    chat(client, messages=messages, max_tokens=1)
    expected = "[system]Be brief.\n[user]a\nb\n[assistant]ok\n[user]more\n[assistant]"
    assert engine.submitted[-1][1] == engine.tokenizer.encode(expected, add_special_tokens=False)


def test_without_max_tokens_generates_to_the_context_limit(client: TestClient) -> None:
    body = chat(client)
    usage = body["usage"]
    assert usage["total_tokens"] == 256
    assert body["choices"][0]["finish_reason"] == "length"


def test_max_completion_tokens_wins(client: TestClient) -> None:
    body = chat(client, max_tokens=9, max_completion_tokens=3)
    assert body["usage"]["completion_tokens"] == 3


def test_n_choices(client: TestClient) -> None:
    body = chat(client, n=3, max_tokens=2)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["choices"][2]["message"]["content"] == DEFAULT_SCRIPT[2:4]
    assert body["usage"]["completion_tokens"] == 6


def test_stop_finish_reason(client: TestClient) -> None:
    body = chat(client, stop=" ", max_tokens=20, seed=3)
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hello"
    assert choice["finish_reason"] == "stop"


def test_logprobs_chat_format(client: TestClient) -> None:
    body = chat(client, max_tokens=2, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["H", "e"]
    assert content[0]["logprob"] == -0.25
    assert content[0]["bytes"] == [72]
    assert content[0]["top_logprobs"] == [
        {"token": "H", "logprob": -0.25, "bytes": [72]},
        {"token": "a", "logprob": -2.0, "bytes": [97]},
    ]


def test_logprobs_without_top(client: TestClient, engine: FakeEngine) -> None:
    body = chat(client, max_tokens=1, logprobs=True)
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert engine.submitted[-1][2].logprobs == 0


def test_stream_framing(client: TestClient) -> None:
    chunks = stream_chunks(client, max_tokens=3)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == DEFAULT_SCRIPT[:3]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_stream_n_and_usage(client: TestClient) -> None:
    chunks = stream_chunks(client, max_tokens=2, n=2, stream_options={"include_usage": True})
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    roles = [c for c in chunks[:-1] if c["choices"][0]["delta"].get("role")]
    assert sorted(c["choices"][0]["index"] for c in roles) == [0, 1]
    finishes = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finishes) == [0, 1]


def test_stream_logprobs(client: TestClient) -> None:
    chunks = stream_chunks(client, max_tokens=2, logprobs=True, top_logprobs=1)
    entries = [e for c in chunks[1:] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in entries] == ["H", "e"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        # The sub-field that holds the bad constraint (it named only "structured_outputs" or
        # "response_format").
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs.json"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
            "response_format.json_schema.schema",
        ),
        ({"guided_json": {"type": "nope"}}, "guided_json"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"chat_template": "{{ 1 }}"}, "chat_template"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"seed": 1.5}, "seed"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"bad_words": "Hello"}, "bad_words"),  # a list of words, as vLLM takes them
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
    ],
)
def test_invalid_fields_are_400(client: TestClient, body: dict, param: str) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER_HI, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_template_error_is_400(client: TestClient) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    response = client.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "system message must come first" in error["message"]


class _ScoringEngine(FakeEngine):
    """Reports a logprob of -1.5 for every prompt token after the first when asked."""

    async def _generate(self, request_id, prompt, params):
        async for output in super()._generate(request_id, prompt, params):
            if params.prompt_logprobs is not None:
                top = (TokenLogprob(EOS_ID, -0.5),)
                output.prompt_logprobs = [
                    PromptTokenLogprob(-1.5, top) for _ in output.prompt_token_ids[1:]
                ]
            yield output


def test_prompt_logprobs_are_returned_as_vllm_does() -> None:
    engine = _ScoringEngine()
    with TestClient(create_app(engine)) as test_client:
        body = chat(test_client, max_tokens=2, prompt_logprobs=1)
        assert "prompt_logprobs" not in chat(test_client, max_tokens=2)
    prompt_ids = engine.tokenizer.encode("[user]Hi\n[assistant]", add_special_tokens=False)
    scored = body["prompt_logprobs"]
    assert len(scored) == len(prompt_ids) and scored[0] is None
    for token_id, entry in zip(prompt_ids[1:], scored[1:], strict=True):
        assert entry[str(token_id)]["logprob"] == -1.5
        assert entry[str(EOS_ID)] == {"logprob": -0.5, "rank": 1, "decoded_token": "</s>"}


def test_add_special_tokens_adds_the_bos_as_tokenize_does(
    client: TestClient, engine: FakeEngine
) -> None:
    """vLLM's chat field; it was accepted and ignored, so /tokenize and the prompt differed."""
    body = chat(client, max_tokens=1, add_special_tokens=True)
    counted = client.post("/tokenize", json={"messages": USER_HI, "add_special_tokens": True})
    assert engine.submitted[-1][1] == counted.json()["tokens"]
    assert engine.submitted[-1][1][0] == engine.tokenizer.bos_token_id
    assert body["usage"]["prompt_tokens"] == counted.json()["count"]

"""Structured output, tool calling and prompt logprobs against the real server, through the
official ``openai`` SDK where it applies."""

from __future__ import annotations

import json
import re
from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import MODEL, LiveServer

pytestmark = pytest.mark.integration

USER = [{"role": "user", "content": "Describe a city as JSON."}]


class Location(BaseModel):
    country: str = Field(max_length=12)
    population: int = Field(ge=0, le=10**9)


class City(BaseModel):
    name: str = Field(max_length=16)
    location: Location
    tags: list[Annotated[str, Field(max_length=10)]] = Field(max_length=2)


def test_json_schema_parse_with_a_nested_pydantic_model(client) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=USER,
        response_format=City,
        temperature=1.0,
        n=20,
        max_tokens=200,
        seed=11,  # seeded: every draw must close its object within max_tokens
    )
    assert len(completion.choices) == 20
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, City)


def test_choice_regex_and_json_object(client) -> None:
    choices = ["yes", "no", "maybe"]
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is water wet?"}],
        max_tokens=5,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert answer.choices[0].message.content in choices
    pattern = r"[A-Z][a-z]{2,8} [0-9]{2}"
    text = client.completions.create(
        model=MODEL, prompt="A name and an age:", max_tokens=12, temperature=1.0,
        extra_body={"structured_outputs": {"regex": pattern}},
    ).choices[0].text  # fmt: skip
    assert re.fullmatch(pattern, text), text
    obj = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=150,
        temperature=0.7,
        seed=4,  # a seeded draw that closes its object within max_tokens
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 999},
                    "b": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
ARGUMENT_KEYS = {"get_weather": {"city"}, "add": {"a", "b"}}


def test_required_tool_choice_always_yields_a_valid_call(client) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, n=6,
        max_tokens=80, seed=12,
    )  # fmt: skip
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        for call in choice.message.tool_calls:
            assert set(json.loads(call.function.arguments)) == ARGUMENT_KEYS[call.function.name]


# A few-shot conversation in the Hermes format, so that the small model calls a tool itself.
AUTO_HISTORY = [
    {"role": "system", "content": "You call tools by writing <tool_call> JSON </tool_call>."},
    {"role": "user", "content": "What is the weather in Rome?"},
    {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
    },
    {"role": "user", "content": "What is the weather in Oslo?"},
    {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    },
    {"role": "user", "content": "What is the weather in Paris?"},
]


def test_auto_streamed_tool_call_then_a_round_trip(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=AUTO_HISTORY, tools=TOOLS, tool_choice="auto", stream=True,
        temperature=0.0, max_tokens=60,
    )  # fmt: skip
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls, calls
    call = calls[0]
    assert set(json.loads(call["arguments"])) == ARGUMENT_KEYS[call["name"]]
    history = [
        *AUTO_HISTORY,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature_c": 21}'},
    ]
    # Greedy, so that the reply does not depend on a draw (a sampled first token may be EOS).
    reply = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", temperature=0.0,
        max_tokens=20,
    )  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].message.content


def test_echo_logprobs_max_tokens_0_match_transformers(live_server: LiveServer, smollm_dir) -> None:
    import torch
    import transformers

    prompt = "The capital of France is Paris. The capital of Italy is"
    response = live_server.http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0},
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == prompt
    got = choice["logprobs"]["token_logprobs"]
    ids = live_server.http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(got) == len(ids) and got[0] is None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_dir), dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert max(abs(a - b) for a, b in zip(got[1:], expected, strict=True)) < 1e-4
    assert response.json()["usage"]["completion_tokens"] == 0
    scored = live_server.http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ids, "prompt_logprobs": 2, "max_tokens": 1},
    ).json()["choices"][0]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    for position, entry in enumerate(scored[1:], start=1):
        chosen = entry[str(ids[position])]
        assert abs(chosen["logprob"] - expected[position - 1]) < 1e-4
        # The real rank, also outside the 2 alternatives (up to near-ties with transformers).
        row = logprobs[position - 1]
        assert int((row >= expected[position - 1] + 1e-4).sum()) <= chosen["rank"]
        assert chosen["rank"] <= int((row >= expected[position - 1] - 1e-4).sum())
        assert len(entry) in (2, 3)  # the prompt token and the 2 most likely (maybe the same)

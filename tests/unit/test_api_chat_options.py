"""Chat options vLLM users send, against the fake engine: assistant prefill, echo, chat
templates, tool choices, continuous usage; and the vLLM serving flags."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.api.context import ChatOptions
from molink.cli.args import EngineArgs, add_engine_args
from tests.helpers.fake_engine import FakeEngine, sse_payloads

USER = [{"role": "user", "content": "Hi"}]
TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}


def make_client(engine: FakeEngine, **chat: object) -> TestClient:
    return TestClient(create_app(engine, ApiConfig(chat=ChatOptions(**chat))))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with make_client(engine) as test_client:
        yield test_client


def prompt_of(engine: FakeEngine) -> str:
    prompt = engine.submitted[-1][1]
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt, False)


def chat(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_continue_final_message_and_echo(client: TestClient, engine: FakeEngine) -> None:
    messages = [*USER, {"role": "assistant", "content": "Sure:"}]
    body = chat(
        client, messages=messages, continue_final_message=True, add_generation_prompt=False,
        echo=True,
    )  # fmt: skip
    assert prompt_of(engine).endswith("[assistant]Sure:")
    assert body["choices"][0]["message"]["content"].startswith("Sure:Hel")


def test_chat_template_kwargs_set_the_rendering_flags_as_in_vllm(
    client: TestClient, engine: FakeEngine
) -> None:
    """vLLM lets them override the fields; here they collided with them (a 400 naming
    messages: the keyword was passed twice)."""
    chat(client, chat_template_kwargs={"add_generation_prompt": False})
    assert prompt_of(engine) == "[user]Hi\n"
    messages = [*USER, {"role": "assistant", "content": "Sure:"}]
    kwargs = {"continue_final_message": True, "add_generation_prompt": False}
    chat(client, messages=messages, chat_template_kwargs=kwargs)
    assert prompt_of(engine).endswith("[assistant]Sure:")
    response = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "chat_template_kwargs": {"add_generation_prompt": "no"}},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "chat_template_kwargs"


def test_documents_reach_the_chat_template(client: TestClient, engine: FakeEngine) -> None:
    """vLLM's field for retrieval templates; it was accepted and never reached the template."""
    seen: list[dict] = []
    render = engine.tokenizer.apply_chat_template

    def recording(messages, add_generation_prompt=True, **kwargs):
        seen.append(kwargs)
        return render(messages, add_generation_prompt, **kwargs)

    engine.tokenizer.apply_chat_template = recording  # type: ignore[method-assign]
    documents = [{"title": "A", "text": "B"}]
    chat(client, documents=documents)
    assert seen[-1]["documents"] == documents
    chat(client)
    assert "documents" not in seen[-1]


def test_request_chat_template_needs_the_flag(engine: FakeEngine) -> None:
    template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    with make_client(engine) as client:
        response = client.post(
            "/v1/chat/completions", json={"messages": USER, "chat_template": template}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "chat_template"
    with make_client(engine, trust_request_chat_template=True) as client:
        chat(client, chat_template=template)
    assert engine.submitted[-1] is not None


def test_a_template_inside_chat_template_kwargs_needs_the_flag_too(engine: FakeEngine) -> None:
    """It reached the template renderer, which used it: the flag was bypassed."""
    template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    body = {"messages": USER, "chat_template_kwargs": {"chat_template": template}}
    for path in ("/v1/chat/completions", "/tokenize"):
        with make_client(engine) as client:
            response = client.post(path, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "chat_template_kwargs"
    with make_client(engine, trust_request_chat_template=True) as client:
        chat(client, chat_template_kwargs={"chat_template": template})


def test_named_tool_choice_streams_the_call(client: TestClient, engine: FakeEngine) -> None:
    named = {"type": "function", "function": {"name": "f"}}
    response = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 3, "tools": [TOOL], "tool_choice": named,
              "stream": True},
    )  # fmt: skip
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "f", "arguments": ""} and calls[0]["id"]
    assert "".join(c["function"]["arguments"] for c in calls) == "Hel"
    assert engine.submitted[-1][2].structured.kind == "json"
    body = chat(client, tools=[TOOL], tool_choice=named)
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "f", "arguments": "Hel"}


def test_auto_tool_choice_needs_the_flags(engine: FakeEngine) -> None:
    with make_client(engine) as client:
        response = client.post("/v1/chat/completions", json={"messages": USER, "tools": [TOOL]})
        assert response.json()["error"]["param"] == "tool_choice"
    with make_client(engine, enable_auto_tool_choice=True, tool_call_parser="hermes") as client:
        body = chat(client, tools=[TOOL])
    assert body["choices"][0]["message"]["content"] == "Hel"
    assert engine.submitted[-1][2].structured.kind == "grammar"


@pytest.mark.parametrize(
    "tool_choice", ["required", "auto", {"type": "function", "function": {"name": "f"}}]
)
def test_a_tool_schema_the_grammar_cannot_take_is_400(
    engine: FakeEngine, tool_choice: object
) -> None:
    """It went to the engine unchecked, whose last stage then failed the request (500)."""
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    body = {"messages": USER, "tools": [broken], "tool_choice": tool_choice}
    with make_client(engine, enable_auto_tool_choice=True, tool_call_parser="hermes") as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools"
    assert not engine.submitted


def test_continuous_usage_stats(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 3, "stream": True,
              "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )  # fmt: skip
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    assert all("usage" in chunk for chunk in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 3
    assert all(c["usage"]["prompt_tokens"] == chunks[0]["usage"]["prompt_tokens"] for c in chunks)


def parse(argv: list[str]) -> EngineArgs:
    import argparse

    namespace = add_engine_args(argparse.ArgumentParser()).parse_args(argv)
    return EngineArgs.from_namespace(namespace)


def test_vllm_flags_are_accepted_and_unknown_ones_fail() -> None:
    args = parse(
        ["--enforce-eager", "--trust-remote-code", "--gpu-memory-utilization", "0.8",
         "--no-enable-prefix-caching", "--generation-config", "vllm", "--disable-log-requests",
         "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    )  # fmt: skip
    assert not args.enable_prefix_caching and args.tool_call_parser == "llama3_json"
    notes = args.ignored_flags()
    assert any("--enforce-eager" in n for n in notes)
    assert any("--gpu-memory-utilization" in n for n in notes)
    with pytest.raises(SystemExit):
        parse(["--no-such-flag"])


def test_chat_template_file_and_generation_defaults(tmp_path) -> None:
    from molink.cli.serve import generation_defaults, read_chat_template

    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[0].content }}", encoding="utf-8")
    assert read_chat_template(str(path)) == "{{ messages[0].content }}"
    assert read_chat_template("{{ x }}") == "{{ x }}"
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "max_length": 10}), encoding="utf-8"
    )
    engine = FakeEngine()
    assert generation_defaults(str(tmp_path), engine) == {"temperature": 0.6, "top_p": 0.9}
    assert generation_defaults("vllm", engine) == {}


def test_generation_defaults_fill_only_what_the_request_leaves_out(engine: FakeEngine) -> None:
    with make_client(engine, generation_defaults={"temperature": 0.6, "top_k": 5}) as client:
        chat(client)
        assert (engine.submitted[-1][2].temperature, engine.submitted[-1][2].top_k) == (0.6, 5)
        chat(client, temperature=0.0)
        assert engine.submitted[-1][2].temperature == 0.0


def test_guided_fields_become_the_same_constraint(client: TestClient, engine: FakeEngine) -> None:
    chat(client, guided_choice=["a", "b"])
    assert engine.submitted[-1][2].structured.kind == "choice"
    chat(client, structured_outputs={"grammar": 'root ::= "a" [0-9]'})
    assert engine.submitted[-1][2].structured.kind == "grammar"
    response = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "guided_regex": "a+", "structured_outputs": {"regex": "b"}},
    )
    assert response.status_code == 400

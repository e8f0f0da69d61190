"""vLLM's return_tokens_as_token_ids (request field and --return-tokens-as-token-ids):
logprobs name each token "token_id:N", so tokens that are not whole characters can be
told apart."""

from __future__ import annotations

import argparse
import json

from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.api.context import ChatOptions
from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.serve import chat_options
from tests.helpers.fake_engine import FakeEngine, sse_payloads

USER = [{"role": "user", "content": "Hi"}]


def client_with(**chat: object) -> TestClient:
    return TestClient(create_app(FakeEngine(), ApiConfig(chat=ChatOptions(**chat))))


def is_id_name(text: str) -> bool:
    return text.startswith("token_id:") and text[len("token_id:") :].isdigit()


def test_completions_name_tokens_by_id() -> None:
    with client_with() as client:
        body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 1, "echo": True}
        plain = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
        named = client.post(
            "/v1/completions", json={**body, "return_tokens_as_token_ids": True}
        ).json()["choices"][0]["logprobs"]
        streamed = client.post(
            "/v1/completions",
            json={**body, "return_tokens_as_token_ids": True, "stream": True},
        )
    assert not any(is_id_name(t) for t in plain["tokens"])
    assert all(is_id_name(t) for t in named["tokens"]) and len(named["tokens"]) == 6
    assert all(is_id_name(k) for top in named["top_logprobs"] if top for k in top)
    chunks = [json.loads(p) for p in sse_payloads(streamed.text) if p != "[DONE]"]
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens == named["tokens"]


def test_chat_names_tokens_by_id_and_the_flag_sets_the_default() -> None:
    body = {"messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": 1}
    with client_with(return_tokens_as_token_ids=True) as client:
        named = client.post("/v1/chat/completions", json=body).json()
        plain = client.post(
            "/v1/chat/completions", json={**body, "return_tokens_as_token_ids": False}
        ).json()
    content = named["choices"][0]["logprobs"]["content"]
    for entry in content:
        assert is_id_name(entry["token"]) and entry["bytes"] == list(entry["token"].encode())
        assert all(is_id_name(alt["token"]) for alt in entry["top_logprobs"])
    assert not any(is_id_name(e["token"]) for e in plain["choices"][0]["logprobs"]["content"])
    assert named["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_the_flag_reaches_the_chat_options() -> None:
    parser = add_engine_args(argparse.ArgumentParser())
    args = EngineArgs.from_namespace(parser.parse_args(["--return-tokens-as-token-ids"]))
    assert chat_options(args, None, {}).return_tokens_as_token_ids

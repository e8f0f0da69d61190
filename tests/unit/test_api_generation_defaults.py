"""generation_config.json's max_new_tokens: the max_tokens of requests that leave it out, as
vLLM (--generation-config auto) takes it, cut to the room the prompt leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.api.context import ChatOptions
from molink.cli.serve import generation_defaults
from tests.helpers.fake_engine import FakeEngine

USER = [{"role": "user", "content": "Hi"}]


def client_with(engine: FakeEngine, defaults: dict) -> TestClient:
    chat = ChatOptions(generation_defaults=defaults)
    return TestClient(create_app(engine, ApiConfig(chat=chat)))


def sent_max_tokens(engine: FakeEngine) -> list[int | None]:
    return [params.max_tokens for _, _, params in engine.submitted]


def post(client: TestClient, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_max_new_tokens_is_read_as_vllm_reads_it(tmp_path: Path) -> None:
    config = {"max_new_tokens": 7, "temperature": 0.5, "max_length": 100}
    (tmp_path / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    defaults = generation_defaults(str(tmp_path), FakeEngine())
    assert defaults == {"max_tokens": 7, "temperature": 0.5}


@pytest.mark.parametrize("value", [0, -3, "12", 1.5, True])
def test_a_max_new_tokens_that_is_no_token_count_is_left_out(tmp_path: Path, value) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"max_new_tokens": value}), encoding="utf-8"
    )
    assert generation_defaults(str(tmp_path), FakeEngine()) == {}


def test_chat_without_max_tokens_takes_the_default() -> None:
    engine = FakeEngine()
    with client_with(engine, {"max_tokens": 5}) as client:
        body = post(client, "/v1/chat/completions", {"messages": USER})
        post(client, "/v1/chat/completions", {"messages": USER, "max_tokens": 3})
        post(client, "/v1/chat/completions", {"messages": USER, "max_completion_tokens": 9})
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"
    assert sent_max_tokens(engine) == [5, 3, 9]


def test_completions_take_it_for_a_null_max_tokens_only() -> None:
    """Left out, a completion's max_tokens is 16 (OpenAI's and vLLM's schema default)."""
    engine = FakeEngine()
    with client_with(engine, {"max_tokens": 5}) as client:
        post(client, "/v1/completions", {"prompt": "Hi", "max_tokens": None})
        post(client, "/v1/completions", {"prompt": "Hi"})
        post(client, "/v1/completions", {"prompt": ["Hi", "Ho"], "max_tokens": None})
    assert sent_max_tokens(engine) == [5, 16, 5, 5]


def test_the_default_is_cut_to_the_room_the_prompt_leaves() -> None:
    """vLLM takes min(default, context left): a long prompt is not refused for it."""
    engine = FakeEngine(max_model_len=64)
    long_chat = [{"role": "user", "content": "x" * 44}]  # "[user]...\n[assistant]": 62 tokens
    long_ids, short_ids = [40] * 61, [40] * 3
    with client_with(engine, {"max_tokens": 5}) as client:
        body = post(client, "/v1/chat/completions", {"messages": long_chat})
        post(client, "/v1/completions", {"prompt": [long_ids, short_ids], "max_tokens": None})
    assert body["usage"] == {"prompt_tokens": 62, "completion_tokens": 2, "total_tokens": 64}
    assert sent_max_tokens(engine) == [2, 3, 5]


def test_without_a_default_max_tokens_stays_open() -> None:
    engine = FakeEngine()
    with client_with(engine, {"temperature": 0.5}) as client:
        post(client, "/v1/chat/completions", {"messages": USER})
    assert sent_max_tokens(engine) == [None]


def test_override_generation_config_wins_over_the_file_as_in_vllm(tmp_path: Path) -> None:
    """vLLM's --override-generation-config (a JSON object laid over generation_config.json,
    with any --generation-config); the flag was an unrecognized argument."""
    import argparse

    from molink.cli.args import EngineArgs, add_engine_args
    from molink.cli.main import parse_engine_args

    config = {"max_new_tokens": 7, "temperature": 0.5}
    (tmp_path / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    parser = add_engine_args(argparse.ArgumentParser())
    override = '{"temperature": 0.9, "max_new_tokens": 3, "top_k": 4}'

    def defaults(setting: str) -> dict:
        flags = ["--generation-config", setting, "--override-generation-config", override]
        args: EngineArgs = parse_engine_args(parser, parser.parse_args(flags))
        return generation_defaults(setting, FakeEngine(), args.override_generation_config)

    assert defaults(str(tmp_path)) == {"temperature": 0.9, "max_tokens": 3, "top_k": 4}
    assert defaults("vllm") == {"temperature": 0.9, "max_tokens": 3, "top_k": 4}


@pytest.mark.parametrize("value", ["[1]", "{oops", '"x"'])
def test_an_override_that_is_no_json_object_is_a_usage_error(value: str, capsys) -> None:
    from molink.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--override-generation-config", value])
    assert exit_info.value.code == 2
    assert "--override-generation-config" in capsys.readouterr().err

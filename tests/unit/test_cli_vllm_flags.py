"""vLLM flags a `vllm serve` command line carries: each is honoured, accepted with a note
where it cannot change anything here, or refused naming its value."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.api.context import ChatOptions
from molink.api.server import make_server
from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.engine_builder import engine_options
from molink.cli.main import parse_engine_args
from molink.cli.serve import chat_options
from molink.errors import InvalidParameterError
from tests.helpers.fake_engine import FakeEngine, sse_payloads

USER = [{"role": "user", "content": "Hi"}]

# Flags vLLM deployment guides put on `vllm serve` lines.
DEPLOYMENT_LINE = (
    "--tokenizer-mode auto --revision main --tokenizer-revision main "
    "--max-seq-len-to-capture 8192 --disable-log-requests --disable-log-stats "
    "--uvicorn-log-level warning --root-path /llm --response-role assistant "
    "--enable-prefix-caching --seed 1 --swap-space 4 --enforce-eager --trust-remote-code "
    "--load-format auto --guided-decoding-backend xgrammar "
    '--structured-outputs-config \'{"backend": "xgrammar"}\' --max-logprobs 10 '
    "--kv-cache-dtype fp8_e4m3 --enable-log-requests --disable-uvicorn-access-log -pp 1 "
    "--reasoning-parser deepseek_r1"
)


def parse(command: str) -> EngineArgs:
    parser = add_engine_args(argparse.ArgumentParser(prog="test"))
    return parse_engine_args(parser, parser.parse_args(shlex.split(command)))


def make(command: str) -> EngineArgs:
    """Without argparse's exit: InvalidParameterError names the field."""
    namespace = add_engine_args(argparse.ArgumentParser()).parse_args(shlex.split(command))
    return EngineArgs.from_namespace(namespace)


def test_a_vllm_deployment_line_starts() -> None:
    args = parse(DEPLOYMENT_LINE)
    assert args.kv_cache_dtype == "fp8"  # vLLM's fp8 is e4m3, which the fp8 cache holds
    assert args.max_logprobs == 10 and args.root_path == "/llm"
    notes = "\n".join(args.ignored_flags())
    for flag in ("xgrammar", "--max-seq-len-to-capture", "--enable-log-requests"):
        assert flag in notes


@pytest.mark.parametrize(("given", "method"), [("awq_marlin", "awq"), ("gptq_marlin", "gptq")])
def test_vllms_marlin_methods_are_the_checkpoints(given: str, method: str) -> None:
    assert parse(f"--quantization {given}").quantization == method


def test_fp8_e5m2_is_refused_by_name() -> None:
    with pytest.raises(InvalidParameterError, match="fp8_e5m2") as info:
        make("--kv-cache-dtype fp8_e5m2")
    assert info.value.field == "kv_cache_dtype"


@pytest.mark.parametrize(
    ("command", "field", "word"),
    [
        ("--tokenizer-mode slow", "tokenizer_mode", "slow"),
        ("--tokenizer-mode mistral", "tokenizer_mode", "mistral"),
        ("--load-format pt", "load_format", "pickled"),
        ("--load-format dummy", "load_format", "dummy"),
        ("--model m.gguf --load-format safetensors", "load_format", "m.gguf"),
        ("--model owner/name --download-dir /data", "download_dir", "HF_HUB_CACHE"),
        (
            "--model owner/name --revision v1 --tokenizer-revision v2",
            "tokenizer_revision",
            "v1",
        ),
        ("--model owner/name --revision v1 -tp 2", "revision", "tensor-parallel"),
        ("--max-logprobs 1025", "max_logprobs", "1024"),
        ("--root-path llm/", "root_path", "llm/"),
        ("--structured-outputs-config '{\"disable_any_whitespace\": true}'",
         "structured_outputs_config", "disable_any_whitespace"),
        ("--structured-outputs-config '{\"backend\": \"magic\"}'",
         "structured_outputs_config", "magic"),
        ("--structured-outputs-config '[1]'", "structured_outputs_config", "object"),
        ("--pipeline-parallel-size 2", "pipeline_parallel_size", "--molink-enabled"),
        ("--tokenizer /nonexistent", "tokenizer", "tokenizer.json"),
    ],
)  # fmt: skip
def test_flags_that_would_change_outputs_are_refused(command: str, field: str, word: str) -> None:
    with pytest.raises(InvalidParameterError, match=word) as info:
        make(command)
    assert info.value.field == field


def test_local_model_notes(tmp_path: Path) -> None:
    args = make(f"--model {tmp_path} --revision v1 --download-dir /data")
    notes = "\n".join(args.ignored_flags())
    assert "--revision" in notes and "--download-dir" in notes


def test_tokenizer_and_revision_reach_the_engine(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    args = make(f"--model owner/name --revision v1 --tokenizer {tmp_path}")
    options = engine_options(args)
    assert (options.tokenizer, options.revision) == (str(tmp_path), "v1")


def test_tokenizer_folder_replaces_the_models(tiny_model_dir, tmp_path: Path) -> None:
    from molink.engine.factory import EngineOptions, model_source

    model = tiny_model_dir("llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, tmp_path / name)
    source = model_source(EngineOptions(model=str(model), tokenizer=str(tmp_path)))
    assert source.tokenizer_dir == tmp_path
    assert model_source(EngineOptions(model=str(model))).tokenizer_dir == model


def test_root_path_and_access_log_reach_uvicorn() -> None:
    app = create_app(FakeEngine())
    server = make_server(app, "127.0.0.1", 0, root_path="/llm", access_log=False)
    assert server.config.root_path == "/llm" and server.config.access_log is False


def client_for(command: str) -> TestClient:
    args = make(command)
    return TestClient(create_app(FakeEngine(), ApiConfig(chat=chat_options(args, None, {}))))


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": 6}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 6}, "logprobs"),
        ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 6},
         "top_logprobs"),
        ("/v1/chat/completions", {"messages": USER, "prompt_logprobs": 6}, "prompt_logprobs"),
        ("/generate", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
    ],
)  # fmt: skip
def test_max_logprobs_bounds_every_logprobs_field(path: str, body: dict, field: str) -> None:
    with client_for("--max-logprobs 5") as client:
        response = client.post(path, json={"max_tokens": 2, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field and "5" in error["message"]
        at_bound = {**body, field: 5} if field != "top_logprobs" else {**body, "top_logprobs": 5}
        assert client.post(path, json={"max_tokens": 2, **at_bound}).status_code == 200


def test_response_role_names_the_reply() -> None:
    with client_for("--response-role bot") as client:
        body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert body.json()["choices"][0]["message"]["role"] == "bot"
        streamed = client.post(
            "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "stream": True}
        )
        first = json.loads(sse_payloads(streamed.text)[0])
        assert first["choices"][0]["delta"]["role"] == "bot"
        # Without a generation prompt the reply continues the last message's role (vLLM).
        prefill = [*USER, {"role": "assistant", "content": "Hel"}]
        cont = client.post(
            "/v1/chat/completions",
            json={"messages": prefill, "max_tokens": 2, "continue_final_message": True},
        )
        assert cont.json()["choices"][0]["message"]["role"] == "assistant"


def test_chat_options_default_to_vllms() -> None:
    options = ChatOptions()
    assert options.max_logprobs == 20 and options.response_role == "assistant"


def test_generation_defaults_come_from_the_model_not_the_tokenizer(tmp_path: Path) -> None:
    from molink.cli.serve import _generation_setting

    model, tokenizer = tmp_path / "model", tmp_path / "tok"
    model.mkdir()
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    (model / "generation_config.json").write_text('{"temperature": 0.3}')
    args = make(f"--model {model} --tokenizer {tokenizer}")
    assert _generation_setting(args) == str(model)
    assert _generation_setting(make(f"--model {model}")) == "auto"


def test_behind_a_root_path_the_probes_stay_open_and_routes_keyed() -> None:
    """uvicorn's path carries --root-path: the key check must see the route's own path."""
    app = create_app(FakeEngine(), ApiConfig(api_key="k"))
    with TestClient(app, root_path="/llm") as client:
        assert client.get("/llm/health").status_code == 200
        assert client.get("/llm/v1/models").status_code == 401
        keyed = client.get("/llm/v1/models", headers={"Authorization": "Bearer k"})
        assert keyed.status_code == 200


def test_a_model_without_a_tokenizer_serves_with_tokenizer(tmp_path: Path) -> None:
    """A weights-only folder (no tokenizer.json) builds an engine once --tokenizer names one."""
    from molink.engine.factory import EngineOptions, build_local_engine
    from tests.helpers.tiny_models import make_tiny_model

    model, tokenizer = make_tiny_model("llama", tmp_path / "model"), tmp_path / "tok"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(model / name, tokenizer / name)
    options = EngineOptions(model=str(model), tokenizer=str(tokenizer), device="cpu")
    engine, _, _ = build_local_engine(options)
    assert engine.tokenizer.name_or_path == str(tokenizer)
    assert engine.tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("value", ["auto", "-1"])
def test_max_model_len_auto_is_refused_saying_what_to_do(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """vLLM's auto (-1): the longest context the memory holds. Not done here: the refusal
    says so and how to get the model's own context, instead of a generic format error."""
    with pytest.raises(SystemExit):
        parse(f"--max-model-len {value}")
    error = capsys.readouterr().err
    assert "--max-model-len" in error and "leave" in error and "model's own" in error

"""vLLM flags for features this server lacks (accepted with a note, or refused naming
the value), and the small HTTP features vLLM has flags for: docs, X-Request-Id headers,
forced usage chunks."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.serve import api_config, chat_options
from molink.errors import InvalidParameterError
from tests.helpers.fake_engine import FakeEngine, sse_payloads

ACCEPTED = (
    "-dp 1 --task generate --distributed-executor-backend mp --disable-custom-all-reduce "
    "--max-parallel-loading-workers 2 --cpu-offload-gb 4 "
    '--speculative-config \'{"method": "ngram"}\' -O3 --limit-mm-per-prompt \'{"image": 0}\' '
    "--code-revision main --max-num-partial-prefills 2 --enable-sleep-mode "
    "--enable-server-load-tracking --otlp-traces-endpoint http://127.0.0.1:4317 "
    "--scheduling-policy fcfs --preemption-mode swap --num-scheduler-steps 8 "
    "--enable-expert-parallel --disable-async-output-proc --use-v2-block-manager "
    "--tokenizer-pool-size 4"
)


def make(command: str) -> EngineArgs:
    namespace = add_engine_args(argparse.ArgumentParser()).parse_args(shlex.split(command))
    return EngineArgs.from_namespace(namespace)


def test_flags_that_change_nothing_are_accepted_with_a_note() -> None:
    notes = "\n".join(make(ACCEPTED).ignored_flags())
    for flag in ("--distributed-executor-backend", "--speculative-config", "--compilation-config",
                 "--cpu-offload-gb", "--limit-mm-per-prompt", "--enable-sleep-mode",
                 "--preemption-mode", "--enable-expert-parallel"):  # fmt: skip
        assert flag in notes
    assert "--data-parallel-size" not in notes and "--task" not in notes  # asked for nothing


@pytest.mark.parametrize(
    ("command", "field"),
    [
        ("-dp 2", "data_parallel_size"),
        ("--task embed", "task"),
        ("--enable-lora", "enable_lora"),
        ("--lora-modules a=/x b=/y", "lora_modules"),
        ("--hf-overrides '{\"rope_theta\": 1}'", "hf_overrides"),
        ("--disable-sliding-window", "disable_sliding_window"),
        ("--tool-parser-plugin p.py", "tool_parser_plugin"),
        ("--enable-prompt-tokens-details", "enable_prompt_tokens_details"),
        ("--scheduling-policy priority", "scheduling_policy"),
        ("--quantization-param-path s.json", "quantization_param_path"),
    ],
)
def test_flags_that_would_change_outputs_are_refused(command: str, field: str) -> None:
    with pytest.raises(InvalidParameterError, match="not supported") as info:
        make(command)
    assert info.value.field == field


def client_for(command: str) -> TestClient:
    args = make(command)
    config = api_config(args, ("fake-model",), (), chat_options(args, None, {}))
    return TestClient(create_app(FakeEngine(), config))


def test_docs_are_served_unless_disabled() -> None:
    with client_for("") as client:
        assert client.get("/openapi.json").status_code == 200
    with client_for("--disable-fastapi-docs") as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404


def test_request_id_headers() -> None:
    with client_for("") as client:
        assert "x-request-id" not in client.get("/health").headers
    with client_for("--enable-request-id-headers") as client:
        assert (
            client.get("/health", headers={"X-Request-Id": "abc"}).headers["x-request-id"] == "abc"
        )
        first = client.get("/v1/models").headers["x-request-id"]
        assert first and first != client.get("/v1/models").headers["x-request-id"]


def test_forced_usage_closes_every_stream() -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "stream": True}
    with client_for("--enable-force-include-usage") as client:
        chunks = [p for p in sse_payloads(client.post("/v1/completions", json=body).text)]
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True},
        )
    assert json.loads(chunks[-2])["usage"]["completion_tokens"] == 2
    assert json.loads(sse_payloads(chat.text)[-2])["usage"]["completion_tokens"] == 2


def test_newer_vllm_flags_start_or_stop_naming_themselves() -> None:
    """Flags of recent vLLM lines were unrecognized arguments (argparse's usage error)."""
    line = (
        "--async-scheduling --logprobs-mode raw_logprobs --max-log-len 100 "
        "--enable-log-outputs --model-impl transformers --h11-max-incomplete-event-size 1000 "
        "--h11-max-header-count 100 --safetensors-load-strategy eager"
    )
    notes = "\n".join(make(line).ignored_flags())
    for flag in ("--async-scheduling", "--max-log-len", "--enable-log-outputs", "--model-impl",
                 "--h11-max-incomplete-event-size", "--safetensors-load-strategy"):  # fmt: skip
        assert flag in notes
    assert "--logprobs-mode" not in notes  # raw_logprobs is what the sampler returns
    # vLLM's exact KV-cache size is this server's --kv-cache-memory.
    assert make("--kv-cache-memory-bytes 4G").kv_cache_memory == 4 * 2**30
    for command, field in (
        ("--logprobs-mode processed_logprobs", "logprobs_mode"),
        ("--logprobs-mode raw_logits", "logprobs_mode"),
    ):
        with pytest.raises(InvalidParameterError, match="not supported") as info:
            make(command)
        assert info.value.field == field

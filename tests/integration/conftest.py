"""One real ``molink serve`` with the default model, shared by every test_server_* module.

The server starts once per session (on first use) with a 512-token context, so that
context-length errors are cheap to provoke, and one torch thread, since test machines are
small and shared. ``LiveServer`` wraps it with the clients and probes the tests need.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from molink.cli.args import DEFAULT_MODEL_NAME
from tests.helpers.server_process import ServerProcess, molink_server

logger = logging.getLogger(__name__)

MODEL = DEFAULT_MODEL_NAME
MAX_MODEL_LEN = 512
# Everything a test server needs to be small: one thread, a short context.
SERVER_ARGS = (
    "--num-threads",
    "1",
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--log-level",
    "warning",
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "hermes",
)
STARTUP_TIMEOUT_S = 300.0
# One decode step of a batch can take a second on a loaded two-core machine.
REQUEST_TIMEOUT_S = 180.0
IDLE_TIMEOUT_S = 60.0
ERROR_FIELDS = {"message", "type", "param", "code"}


def parse_metrics(text: str) -> dict[str, float]:
    """``name -> value`` of the Prometheus lines without extra labels beyond the model's.

    Lines with further labels (histogram buckets, finish reasons) are keyed by the full
    ``name{labels}`` text so that they never shadow a gauge.
    """
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        simple = labels.count("=") <= 1
        values[name if simple else key] = float(value)
    return values


def assert_error_body(
    response: httpx.Response,
    status: int,
    param: str | None = None,
    *,
    check_param: bool = True,
) -> dict[str, Any]:
    """The status and OpenAI's ``{"error": {message, type, param, code}}``; returns the error."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if check_param:
        assert error["param"] == param, error
    return error


@dataclass
class StreamedChoice:
    """What a client saw of one choice of a streamed response."""

    text: str = ""
    num_tokens: int = 0  # counted from the per-token logprobs entries
    finish_reason: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Streamed:
    """One streamed response, choice by choice, with its usage chunk (if any)."""

    choices: dict[int, StreamedChoice]
    usage: Any
    num_usage_chunks: int


def _choice_extras(choice: Any) -> dict[str, Any]:
    return dict(choice.model_extra or {})


def collect_chat_stream(chunks: Iterable[Any]) -> Streamed:
    choices: dict[int, StreamedChoice] = {}
    usage, num_usage_chunks = None, 0
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == MODEL
        if chunk.usage is not None:
            usage, num_usage_chunks = chunk.usage, num_usage_chunks + 1
        for choice in chunk.choices:
            state = choices.setdefault(choice.index, StreamedChoice())
            assert state.finish_reason is None, "a chunk arrived after the choice finished"
            state.text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content is not None:
                state.num_tokens += len(choice.logprobs.content)
            if choice.finish_reason is not None:
                state.finish_reason = choice.finish_reason
                state.extras = _choice_extras(choice)
    return Streamed(choices, usage, num_usage_chunks)


def collect_completion_stream(chunks: Iterable[Any]) -> Streamed:
    choices: dict[int, StreamedChoice] = {}
    usage, num_usage_chunks = None, 0
    for chunk in chunks:
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            usage, num_usage_chunks = chunk.usage, num_usage_chunks + 1
        for choice in chunk.choices:
            state = choices.setdefault(choice.index, StreamedChoice())
            assert state.finish_reason is None, "a chunk arrived after the choice finished"
            state.text += choice.text
            if choice.logprobs is not None and choice.logprobs.tokens is not None:
                state.num_tokens += len(choice.logprobs.tokens)
            if choice.finish_reason is not None:
                state.finish_reason = choice.finish_reason
                state.extras = _choice_extras(choice)
    return Streamed(choices, usage, num_usage_chunks)


@dataclass
class LiveServer:
    """A running server and ways to talk to it."""

    process: ServerProcess
    api_key: str = "unused"
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base_url, timeout=REQUEST_TIMEOUT_S)

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def port(self) -> int:
        return self.process.port

    def sync_client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key,
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
        )

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key,
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
        )

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int:
        """The token count of the rendered chat prompt, as /tokenize reports it."""
        response = self.http.post("/tokenize", json={"model": MODEL, "messages": messages})
        response.raise_for_status()
        return response.json()["count"]

    def count_prompt_tokens(self, prompt: str) -> int:
        response = self.http.post("/tokenize", json={"model": MODEL, "prompt": prompt})
        response.raise_for_status()
        return response.json()["count"]

    def metrics(self) -> dict[str, float]:
        response = self.http.get("/metrics")
        response.raise_for_status()
        return parse_metrics(response.text)

    def wait_until_idle(self, timeout: float = IDLE_TIMEOUT_S) -> dict[str, float]:
        """Polls /metrics until nothing runs or waits and every KV block is free."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            if is_idle(values) or time.monotonic() > deadline:
                return values
            time.sleep(0.1)

    def close(self) -> None:
        self.http.close()


def is_idle(values: dict[str, float]) -> bool:
    return (
        values["molink:num_requests_running"] == 0
        and values["molink:num_requests_waiting"] == 0
        and values["molink:num_free_kv_blocks"] == values["molink:num_total_kv_blocks"]
    )


def assert_idle(server: LiveServer, timeout: float = IDLE_TIMEOUT_S) -> None:
    values = server.wait_until_idle(timeout)
    gauges = {k: v for k, v in values.items() if k.startswith("molink:num")}
    assert is_idle(values), f"server not idle after {timeout:.0f}s: {gauges}"
    assert values["molink:num_total_kv_blocks"] > 0


@contextlib.contextmanager
def live_server_process(
    extra_args: tuple[str, ...] = (), api_key: str | None = None
) -> Iterator[LiveServer]:
    """A fresh ``molink serve`` (default model), stopped with SIGTERM when the block ends."""
    args = [*SERVER_ARGS, *extra_args]
    if api_key is not None:
        args += ["--api-key", api_key]
    with molink_server(args, startup_timeout=STARTUP_TIMEOUT_S) as process:
        server = LiveServer(process, api_key=api_key or "unused")
        try:
            yield server
        finally:
            server.close()


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    """The shared real server, started on first use and stopped at the end of the session."""
    with live_server_process() as server:
        logger.info("shared molink server on %s", server.base_url)
        yield server


@pytest.fixture(scope="session")
def client(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    sdk = live_server.sync_client()
    yield sdk
    sdk.close()


@pytest.fixture
async def async_client(live_server: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    # Per test: an async client is bound to the event loop it first ran on.
    sdk = live_server.async_client()
    yield sdk
    await sdk.close()

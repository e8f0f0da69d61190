"""Stopping a real server with a stream in flight, and the README's examples run as written."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers.server_process import REPO_ROOT, port_is_free
from tests.integration.conftest import (
    MAX_MODEL_LEN,
    MODEL,
    LiveServer,
    assert_error_body,
    live_server_process,
)

pytestmark = pytest.mark.integration

README = REPO_ROOT / "README.md"
README_ADDRESS = "localhost:8000"
EXAMPLE_TIMEOUT_S = 300.0
EXIT_TIMEOUT_S = 30.0


@dataclass
class StreamReader:
    """Reads one SSE response in a thread, so the test can signal the server meanwhile."""

    events: list[str] = field(default_factory=list)
    first_content: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def read(self, base_url: str, body: dict) -> None:
        try:
            with httpx.stream(
                "POST", f"{base_url}/v1/chat/completions", json=body, timeout=60
            ) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    self.events.append(line[len("data: ") :])
                    if '"content":"' in line and '"content":""' not in line:
                        self.first_content.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.first_content.set()


def test_sigterm_ends_requests_in_flight_and_exits_zero() -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
        "max_tokens": MAX_MODEL_LEN - 64,
        "ignore_eos": True,
    }
    with live_server_process() as server, ThreadPoolExecutor(1) as pool:
        process = server.process.process
        url = f"{server.base_url}/v1/chat/completions"
        non_streamed = pool.submit(httpx.post, url, json=body, timeout=120)
        reader = StreamReader()
        stream_body = {**body, "stream": True}
        thread = threading.Thread(target=reader.read, args=(server.base_url, stream_body))
        thread.start()
        assert reader.first_content.wait(timeout=120), "no content before the timeout"
        assert reader.error is None, reader.error
        process.send_signal(signal.SIGTERM)
        thread.join(timeout=EXIT_TIMEOUT_S)
        assert not thread.is_alive(), "the stream did not end after SIGTERM"
        response = non_streamed.result(timeout=EXIT_TIMEOUT_S)
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 0, server.process.log_tail()
    # The stream ends with an error event, then [DONE]; the waiting request gets a 503.
    assert reader.error is None, reader.error
    assert reader.events[-1] == "[DONE]", reader.events[-3:]
    error = json.loads(reader.events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "shutting down" in error["message"]
    assert "shutting down" in assert_error_body(response, 503)["message"]
    # The port is free for the next server at once.
    assert _wait_until(lambda: port_is_free(server.port), timeout=10)


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# -- README ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    language: str
    code: str


def readme_examples(path: Path = README) -> list[Example]:
    """The fenced blocks that talk to a running server: curl commands and openai SDK code."""
    blocks = re.findall(r"```(\w+)\n(.*?)```", path.read_text(), flags=re.DOTALL)
    examples = [
        Example(language, code)
        for language, code in blocks
        if (language == "bash" and code.lstrip().startswith("curl"))
        or (language == "python" and "openai" in code)
    ]
    return examples


def _pointed_at(example: Example, server: LiveServer) -> Example:
    # Only the address changes: the shared server may not own port 8000.
    assert README_ADDRESS in example.code, example.code
    return Example(
        example.language, example.code.replace(README_ADDRESS, f"127.0.0.1:{server.port}")
    )


def _run(example: Example) -> subprocess.CompletedProcess[str]:
    command = ["bash", "-c", example.code] if example.language == "bash" else [sys.executable]
    return subprocess.run(
        command,
        input=None if example.language == "bash" else example.code,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        cwd=REPO_ROOT,
    )


def _check_curl_output(example: Example, stdout: str) -> None:
    # curl exits 0 on HTTP errors too, so the body is what tells.
    body = json.loads(stdout)
    assert "error" not in body, (example.code, body)
    if "/v1/chat/completions" in example.code:
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] > 0
    if "/generate" in example.code:
        (text,) = body["text"]
        assert text.startswith("San Francisco is a") and len(text) > len("San Francisco is a")


def test_readme_has_curl_and_sdk_examples() -> None:
    examples = readme_examples()
    curls = [e.code for e in examples if e.language == "bash"]
    assert any("/v1/chat/completions" in code for code in curls)
    assert any("/generate" in code for code in curls)
    assert any(e.language == "python" for e in examples)


def test_readme_examples_run_against_the_server(live_server: LiveServer) -> None:
    examples = [_pointed_at(e, live_server) for e in readme_examples()]
    # Run together: the server batches them, which keeps the test short.
    with ThreadPoolExecutor(len(examples)) as pool:
        results = list(pool.map(_run, examples))
    for example, result in zip(examples, results, strict=True):
        assert result.returncode == 0, (example.code, result.stdout, result.stderr)
        assert result.stdout.strip(), (example.code, result.stderr)
        if example.language == "bash":
            _check_curl_output(example, result.stdout)

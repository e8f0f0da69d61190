"""The real serving path in a subprocess (fake engine behind it): signals and clean exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers.server_process import (
    ServerProcess,
    free_port,
    molink_server,
    port_is_free,
    start_process,
    stop_process,
    wait_for_health,
)

STARTUP_SECONDS = 60.0


def start_fake_server(*flags: str) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable, "-m", "tests.helpers.fake_engine", "--host", "127.0.0.1",
        "--port", str(port), "--step-delay", "0.05", *flags,
    ]  # fmt: skip
    server = start_process(command, port)
    try:
        wait_for_health(server, STARTUP_SECONDS)
    except BaseException:
        stop_process(server.process)
        raise
    return server


def read_stream_then_signal(server: ServerProcess, sig: signal.Signals) -> list[str]:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "stream": True}
    payloads: list[str] = []
    with httpx.Client(timeout=20.0) as client:
        url = f"{server.base_url}/v1/chat/completions"
        with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payloads.append(line[len("data: ") :])
                if len(payloads) == 3:
                    server.process.send_signal(sig)
    return payloads


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_and_exits_zero(sig: signal.Signals) -> None:
    server = start_fake_server()
    try:
        payloads = read_stream_then_signal(server, sig)
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert "shutting down" in error["message"]
        assert server.process.wait(timeout=20) == 0, server.log_tail()
    finally:
        stop_process(server.process)
    deadline = time.monotonic() + 10
    while not port_is_free(server.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert port_is_free(server.port)


def test_idle_server_stops_on_sigterm_with_status_zero() -> None:
    server = start_fake_server("--api-key", "k")
    try:
        response = httpx.get(f"{server.base_url}/v1/models", timeout=5.0)
        assert response.status_code == 401
        models = httpx.get(
            f"{server.base_url}/v1/models", headers={"Authorization": "Bearer k"}, timeout=5.0
        ).json()
        assert {m["id"] for m in models["data"]} == {"SmolLM2-135M-Instruct", "fake-model"}
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0, server.log_tail()
    finally:
        stop_process(server.process)


@pytest.mark.parametrize(
    "module",
    [
        "molink.cli.main",
        "molinkv1.entrypoints.api_server",
        "molinkv1.entrypoints.openai.api_server",
    ],
)
def test_module_help_runs(module: str) -> None:
    argv = [
        sys.executable,
        "-m",
        module,
        *(["serve"] if module == "molink.cli.main" else []),
        "--help",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--molink-initial-peer" in result.stdout


def test_server_process_helper_reports_a_server_that_exits() -> None:
    with pytest.raises(RuntimeError, match="exited with status 2"):
        with molink_server(["--molink-start-layer", "5"], startup_timeout=30):
            pass

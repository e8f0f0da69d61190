"""Starting MoLink servers for tests: a real ``molink serve`` subprocess, or an app in a thread.

Everything listens on 127.0.0.1 and is stopped in ``finally``, whatever the test does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before by this process: the kernel may give the
    same free port to two binds in a row, and a node whose HTTP and gRPC ports are the same
    one refuses to start."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now (as servers do, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, num_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""


def wait_for_health(server: ServerProcess, timeout: float, require_ready: bool = True) -> None:
    """Polls /health until 200 (or any answer, when not require_ready); fails if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with status {server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{server.base_url}/health", timeout=2.0)
            if response.status_code == 200 or not require_ready:
                return
        time.sleep(0.2)
    raise TimeoutError(f"server not healthy after {timeout:.0f}s:\n{server.log_tail()}")


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("server %d ignored SIGTERM; killing it", process.pid)
            process.kill()
    return process.wait(timeout=timeout)


def start_process(
    command: Sequence[str], port: int, env: dict[str, str] | None = None
) -> ServerProcess:
    log_file = tempfile.NamedTemporaryFile(prefix="molink-server-", suffix=".log", delete=False)
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    process = subprocess.Popen(
        list(command), cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
    )
    log_file.close()
    return ServerProcess(process, port, Path(log_file.name))


@contextlib.contextmanager
def molink_server(
    args: Sequence[str] = (),
    *,
    command: str = "serve",
    port: int | None = None,
    startup_timeout: float = 300.0,
    require_ready: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """``python -m molink.cli.main serve --host 127.0.0.1 --port P ARGS``, healthy, then stopped."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "molink.cli.main",
        command,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
    ]
    server = start_process([*argv, *args], port, env)
    try:
        wait_for_health(server, startup_timeout, require_ready)
        yield server
    finally:
        stop_process(server.process)


@pytest.fixture
def molink_server_factory() -> Iterator:
    """Use as ``with molink_server_factory(["--model", path]) as server: ...``; all stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(args: Sequence[str] = (), **kwargs: object) -> ServerProcess:
            return stack.enter_context(molink_server(args, **kwargs))  # type: ignore[arg-type]

        yield start


class ThreadedServer:
    """Serves an ASGI app with uvicorn in a background thread (no signal handling there)."""

    def __init__(self, app: object, port: int | None = None) -> None:
        from molink.api.server import make_server

        self.port = port or free_port()
        self.server = make_server(app, LOOPBACK, self.port, log_level="warning")  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + 20.0
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=20.0)

"""Starting, stopping and the byte-pipe contract: shutdown, half-close, gRPC, the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from molink.netem import LinkEmulator, LinkProxy, LinkSpec
from molink.netem.probe import ProbeServer, bulk_up, measure_rtt, open_echo, ping

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[ProbeServer]:
    with ProbeServer(HOST, timeout_s=10.0) as srv:
        yield srv


def _closed_by_peer(sock: socket.socket, timeout_s: float = 5.0) -> bool:
    """Whether the peer ends the stream (EOF or reset) within the timeout."""
    sock.settimeout(timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def test_stop_with_connections_open(server: ProbeServer) -> None:
    emu = LinkEmulator(HOST, 0, HOST, server.port, LinkSpec(20, 10)).start()
    idle = [open_echo(HOST, emu.port, timeout_s=5.0) for _ in range(3)]
    for sock in idle:
        ping(sock)
    # One connection is mid-transfer (5 MB at 20 Mbit/s would take 2 s) when stop() comes.
    errors: list[BaseException] = []

    def push() -> None:
        try:
            bulk_up(HOST, emu.port, 5_000_000, timeout_s=10.0)
        except (OSError, ConnectionError) as exc:
            errors.append(exc)

    pusher = threading.Thread(target=push)
    pusher.start()
    time.sleep(0.2)
    assert emu.stats().connections_open == 4
    t0 = time.monotonic()
    emu.stop(timeout_s=5.0)
    assert time.monotonic() - t0 < 3.0
    assert not emu.running
    for sock in idle:
        with sock:
            assert _closed_by_peer(sock)
    pusher.join(10.0)
    assert not pusher.is_alive() and errors, "the interrupted transfer should fail"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, emu.port), timeout=2.0).close()
    emu.stop()  # a second stop is harmless


def test_half_close_passes_through(server: ProbeServer) -> None:
    payload = b"last words" * 1000
    with LinkEmulator(HOST, 0, HOST, server.port, LinkSpec(100, 5)) as emu:
        with open_echo(HOST, emu.port, timeout_s=5.0) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                got += data
        assert bytes(got) == payload


def test_unreachable_target_closes_the_client() -> None:
    with (
        LinkEmulator(HOST, 0, HOST, _free_port(), LinkSpec(100, 1)) as emu,
        socket.create_connection((HOST, emu.port), timeout=5.0) as sock,
    ):
        assert _closed_by_peer(sock)


def test_port_in_use_is_reported_by_start(server: ProbeServer) -> None:
    with pytest.raises(OSError):
        LinkEmulator(HOST, server.port, HOST, server.port, LinkSpec(100, 1)).start()


async def test_proxy_on_the_callers_loop(server: ProbeServer) -> None:
    async with LinkProxy(HOST, 0, HOST, server.port, LinkSpec(100, 10)) as proxy:
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        writer.write(b"E" + b"hello")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(reader.readexactly(5), 5.0) == b"hello"
        assert loop.time() - t0 >= 0.020
        writer.close()
    assert proxy.stats().connections_open == 0


def _grpc_server() -> tuple[grpc.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        "netem.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
            "Stream": grpc.unary_stream_rpc_method_handler(lambda req, ctx: iter([req] * 3)),
        },
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port(f"{HOST}:0")
    srv.start()
    return srv, port


def test_grpc_passes_through_unchanged() -> None:
    srv, port = _grpc_server()
    payload = os.urandom(1_000_000)
    try:
        with LinkEmulator(HOST, 0, HOST, port, LinkSpec(100, 10)) as emu:
            options = [("grpc.enable_http_proxy", 0)]
            with grpc.insecure_channel(f"{HOST}:{emu.port}", options=options) as channel:
                unary = channel.unary_unary("/netem.Echo/Unary")
                stream = channel.unary_stream("/netem.Echo/Stream")
                assert unary(b"warm up", timeout=10.0) == b"warm up"
                t0 = time.monotonic()
                assert unary(payload, timeout=10.0) == payload
                # One round trip at least, plus 1 MB each way at 100 Mbit/s.
                assert time.monotonic() - t0 >= 0.020 + 2 * 0.080
                assert list(stream(b"abc", timeout=10.0)) == [b"abc"] * 3
            assert emu.bytes_up > len(payload) and emu.bytes_down > len(payload)
    finally:
        srv.stop(grace=None)


def test_cli_runs_until_sigterm(server: ProbeServer, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "molink.netem", "--listen", f"{HOST}:0"]
    cmd += ["--target", f"{HOST}:{server.port}", "--rate-mbit", "100", "--rtt-ms", "30"]
    cmd += ["--port-file", str(port_file), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 20.0
        while not port_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert port_file.exists(), "the CLI never reported its port"
        rtts = measure_rtt(HOST, int(port_file.read_text()), count=5, timeout_s=5.0)
        assert min(rtts) >= 30.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10.0) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5.0)


def test_cli_rejects_bad_addresses() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "molink.netem", "--listen", "nowhere", "--target", "x:1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, timeout=20.0)
    assert proc.returncode == 2
    assert b"HOST:PORT" in proc.stderr
